"""Issues 10.3 and 12.2 on a live service: real causes as a non-root service account, and bytes
that cannot change after the claim (held descriptors, hard links, truncation, chmod).

Tests run as root and root reads everything, so the service runs as a system user here.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.corpus import emr_pipeline, good_emr, published_names, rejected
from tests.support.service import REPO
from tests.support.users import SERVICE_USER, ensure_user, owned_tree, reachable
from tests.support.waiting import wait_until
from tests.system.conftest import MakeService

PRODUCER_UID = 4243  # another member of the producers' group: owns its uploads
OTHER_UID = 4242  # a user whose private files the service must not read
UNREADABLE = {"private.csv": 0o600, "no-bits.csv": 0o000, "write-only.csv": 0o200}
KEPT_ON_TRUNCATE = len(b"".join(good_emr(2).splitlines(keepends=True)[:4]))
APPENDED = b"000001,copd,50,120.0\n" * 5


# Every test that makes the checkout reachable for another user runs in one xdist worker, so
# that one test's restoring of folder modes never pulls the ground from under another's.
pytestmark = pytest.mark.xdist_group("service-user")


@pytest.fixture(scope="module", autouse=True)
def checkout_reachable() -> Iterator[None]:
    """The service account must read the code under test, wherever the checkout lies (a CI
    clone may sit in a 0700 temp folder)."""
    with reachable([REPO]):
        yield


@pytest.fixture(scope="session")
def service_user() -> pwd.struct_passwd:
    return ensure_user(SERVICE_USER)


@pytest.fixture
def user_root(service_user: pwd.struct_passwd) -> Iterator[Path]:
    with owned_tree(service_user) as root:
        yield root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inbox_of(root: Path, owner: pwd.struct_passwd | None) -> Path:
    inbox = root / "inbox" / "emr"
    inbox.mkdir(parents=True)
    if owner is not None:
        for folder in (root / "inbox", inbox):
            os.chown(folder, owner.pw_uid, owner.pw_gid)
    return inbox


def archived(root: Path) -> list[Path]:
    return [p for p in (root / "state" / "archive").rglob("*") if p.is_file()]


def test_a_non_root_service_reports_each_cause_as_itself(
    make_service: MakeService, service_user: pwd.struct_passwd, user_root: Path
) -> None:
    """Another user's private files (0600, 0000, write-only) are permission_denied with EACCES,
    never symlink, left in the inbox and reported once across rescans; a link is a symlink;
    readable files of other owners are published from a private copy the service owns."""
    service = make_service(
        [emr_pipeline(settle_s=0.1, max_wait=0.3)],
        root=user_root,
        service={"tick_s": 0.1, "rescan_s": 0.3},
    )
    inbox = inbox_of(user_root, service_user)
    for name, mode in UNREADABLE.items():
        (inbox / name).write_bytes(good_emr(1))
        os.chown(inbox / name, OTHER_UID, OTHER_UID)
        (inbox / name).chmod(mode)
    (inbox / "theirs.csv").write_bytes(good_emr(2))
    os.chown(inbox / "theirs.csv", PRODUCER_UID, PRODUCER_UID)
    (inbox / "link.csv").symlink_to("/etc/passwd")

    service.start(user=SERVICE_USER)
    service.drop("emr", "good.csv", good_emr(3))
    wait_until(lambda: published_names(service) == {"theirs.csv", "good.csv"}, 30)
    # rescans later (every 0.3 s), a second file: the refused ones were not reported again
    service.drop("emr", "later.csv", good_emr(4))
    wait_until(lambda: "later.csv" in published_names(service), 30)
    assert service.stop() == 0

    assert rejected(service) == {
        **{name: ["permission_denied"] for name in UNREADABLE},
        "link.csv": ["symlink"],
    }
    assert all((inbox / name).exists() for name in [*UNREADABLE, "link.csv"])
    lines = [e for e in service.logs() if e.get("event") == "file.rejected"]
    denied = [e for e in lines if e["reason"] == "permission_denied"]
    assert len(denied) == len(UNREADABLE) and {e["errno"] for e in denied} == {"EACCES"}
    assert not any(name in service.stderr() for name in [*UNREADABLE, "theirs.csv"])
    assert not service.quarantined()
    # what is kept is the service's own private copy
    wait_until(lambda: len(archived(user_root)) == 3, 15, message="archived")
    for path in archived(user_root):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (service_user.pw_uid, 0o600, 1)


@pytest.mark.parametrize("as_user", [False, True], ids=["root-service", "user-service"])
def test_claimed_bytes_cannot_change_after_the_claim(
    make_service: MakeService,
    service_user: pwd.struct_passwd,
    user_root: Path,
    as_user: bool,
) -> None:
    """A producer appends or truncates through a descriptor held across the rename, or writes,
    truncates and chmods through a second name made before the drop: every manifest's size and
    sha256 are those of the archived bytes, which the producer can neither change nor read."""
    service = make_service(
        [emr_pipeline(settle_s=0.1, max_wait=0.3, allow_hard_links=True)],
        root=user_root,
        service={"tick_s": 0.1, "rescan_s": 0.5},
    )
    owner = service_user if as_user else None
    inbox = inbox_of(user_root, owner)
    producer = user_root / "producer"
    producer.mkdir()
    service.start(user=SERVICE_USER if as_user else None)

    # Given: uploads renamed in while their writer keeps the descriptor
    held = {}
    for seed, name in ((1, "append.csv"), (2, "truncate.csv")):
        part = inbox / f".{name}.part"
        held[name] = part.open("wb")
        held[name].write(good_emr(seed))
        held[name].flush()
        os.chown(part, PRODUCER_UID, PRODUCER_UID)
        os.rename(part, inbox / name)
    # and uploads with a second name the producer keeps
    for i, name in enumerate(("write.csv", "chmod.csv")):
        (producer / name).write_bytes(good_emr(10 + i))
        os.chown(producer / name, PRODUCER_UID, PRODUCER_UID)
        os.link(producer / name, inbox / name)

    # When: the service had every chance to claim them, the producer changes them
    service.drop("emr", "marker.csv", good_emr(20))
    try:
        try:
            wait_until(
                lambda: {"marker.csv", "write.csv", "chmod.csv"} <= published_names(service),
                30,
                message="marker, write and chmod published",
            )
        except AssertionError as exc:  # what the service did, to tell a slow run from a bug
            events = [(x.get("event"), x.get("reason")) for x in service.logs()]
            raise AssertionError(f"{exc}; published {published_names(service)}; {events}") from None
        held["append.csv"].write(APPENDED)
        held["truncate.csv"].truncate(KEPT_ON_TRUNCATE)
    finally:
        for f in held.values():
            f.close()  # also when the wait fails: a leaked descriptor fails a later test
    with (producer / "write.csv").open("r+b") as fh:
        fh.write(b"OVERWRITTEN")
        fh.truncate(30)
    (producer / "chmod.csv").chmod(0o666)
    names = {"append.csv", "truncate.csv", "write.csv", "chmod.csv", "marker.csv"}
    wait_until(lambda: published_names(service) == names, 30, message="all published")
    wait_until(lambda: len(archived(user_root)) == len(names), 15, message="all archived")
    assert service.stop() == 0

    # Then: the books, the processed bytes and the kept bytes agree
    inputs = service.published_inputs()
    kept = {sha(p.read_bytes()): p.stat() for p in archived(user_root)}
    assert {(i["sha256"], i["size"]) for i in inputs} == {
        (digest, st.st_size) for digest, st in kept.items()
    }
    uid = service_user.pw_uid if as_user else 0
    for st in kept.values():
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (uid, 0o600, 1)
    producer_inodes = {(producer / n).stat().st_ino for n in ("write.csv", "chmod.csv")}
    assert not producer_inodes & {st.st_ino for st in kept.values()}
    if not as_user:
        # root holds CAP_LEASE: a held upload is taken only once its writer closed it
        by_name = {i["name"]: i for i in inputs}
        assert by_name["append.csv"]["size"] == len(good_emr(1)) + len(APPENDED)
        assert by_name["truncate.csv"]["size"] == KEPT_ON_TRUNCATE
