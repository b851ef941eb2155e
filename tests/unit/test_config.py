"""Config loading: defaults, human units, path resolution, and errors that name the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from daemon.config import config_path_from, load_settings
from daemon.errors import ConfigError

MINIMAL = '[[pipeline]]\nname = "emr"\nkind = "emr"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "medbatch.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """`../inbox` in /x/conf/medbatch.toml means /x/inbox."""
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.paths.inbox == tmp_path / "inbox"
    assert settings.paths.spool == tmp_path / "state" / "spool"


def test_human_sizes_and_durations(tmp_path: Path) -> None:
    """ "64MiB" and "2m" are accepted beside plain numbers."""
    settings = load_settings(write(tmp_path, MINIMAL + 'max_bytes = "64MiB"\nmax_wait = "2m"\n'))
    assert settings.pipeline[0].max_bytes == 64 * 1024**2
    assert settings.pipeline[0].max_wait == 120.0


def test_processor_options_are_validated_by_the_kind(tmp_path: Path) -> None:
    """A pipeline's extra keys are its processor's options."""
    settings = load_settings(write(tmp_path, MINIMAL + 'group_by = "ward"\n'))
    assert settings.pipeline[0].options["group_by"] == "ward"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + "max_filez = 3\n", "pipeline[0].max_filez"),
        (MINIMAL + "group_byy = 'x'\n", "pipeline[0].group_byy"),
        ('[[pipeline]]\nname = "emr"\nkind = "nope"\n', "pipeline[0].kind"),
        ("[workers]\ncount = 0\n" + MINIMAL, "workers.count"),
        ("[workers]\nsurprise = 1\n" + MINIMAL, "workers.surprise"),
        ("[workers]\nnice = 20\n" + MINIMAL, "workers.nice"),
        ("[workers]\nnice = -5\n" + MINIMAL, "workers.nice"),
        (MINIMAL + 'max_wait = "soon"\n', "pipeline[0].max_wait"),
        ('[paths]\noutbox = "../inbox/out"\n' + MINIMAL, "paths.outbox"),
        ('[paths]\nquarantine = "../state/q"\n' + MINIMAL, "paths.state"),
        (MINIMAL + MINIMAL, "pipeline"),
        ('[[pipeline]]\nname = "Bad Name"\nkind = "emr"\n', "pipeline[0].name"),
        ("[workers]\nexecutor = 'dask'\n" + MINIMAL, "workers.scheduler_address"),
        ("this is not toml", "config"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """Every invalid config raises ConfigError whose key points at the culprit."""
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert caught.value.key == key, str(caught.value)
    assert str(caught.value).startswith(key)


@pytest.mark.parametrize("kind", ["emr", "genomics"])
@pytest.mark.parametrize("period", ["all", "day"])
def test_rollup_is_kept_by_kinds_with_mergeable_statistics(
    tmp_path: Path, kind: str, period: str
) -> None:
    """`rollup` on an emr or a genomics pipeline is a setting; on imaging, an error naming it."""
    text = f'[[pipeline]]\nname = "p"\nkind = "{kind}"\nrollup = "{period}"\n'
    assert load_settings(write(tmp_path, text)).pipeline[0].rollup == period
    imaging = text.replace(f'"{kind}"', '"imaging"')
    with pytest.raises(ConfigError, match=r"'imaging' \(only emr, genomics") as caught:
        load_settings(write(tmp_path, imaging))
    assert caught.value.key == "pipeline[0].rollup"


def test_unknown_kind_lists_the_known_ones(tmp_path: Path) -> None:
    """The message for an unknown kind lists every registered kind."""
    with pytest.raises(ConfigError, match=r"known: emr, .*genomics.*imaging"):
        load_settings(write(tmp_path, '[[pipeline]]\nname = "x"\nkind = "nope"\n'))


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--config, else $MEDBATCH_CONFIG, else ./config/medbatch.toml if it exists."""
    monkeypatch.delenv("MEDBATCH_CONFIG", raising=False)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "medbatch.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert config_path_from(None) == Path("config/medbatch.toml")
    monkeypatch.setenv("MEDBATCH_CONFIG", "/etc/m.toml")
    assert config_path_from(None) == Path("/etc/m.toml")
    assert config_path_from("/x.toml") == Path("/x.toml")


def test_the_example_config_is_valid() -> None:
    """config/medbatch.toml, which `make run` uses, loads."""
    settings = load_settings(Path(__file__).resolve().parents[2] / "config" / "medbatch.toml")
    assert [p.name for p in settings.pipeline] == ["emr", "imaging", "genomics"]


@pytest.mark.parametrize(
    "text",
    [MINIMAL, "# a comment changes the hash\n" + MINIMAL, MINIMAL.replace("\n", "\r\n")],
    ids=["plain", "comment", "crlf"],
)
def test_config_sha256_is_the_hash_of_the_file_bytes(tmp_path: Path, text: str) -> None:
    """Provenance names the config by the sha256 of its bytes as loaded (as sha256sum says)."""
    path = write(tmp_path, text)
    assert load_settings(path).config_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", ["config_path", "config_sha256"])
def test_internal_settings_cannot_be_written_in_the_file(tmp_path: Path, key: str) -> None:
    """The loader sets these; a config that tries to is refused, naming the key."""
    with pytest.raises(ConfigError, match=key):
        load_settings(write(tmp_path, f'{key} = "x"\n' + MINIMAL))
