"""Worker side: a third-party log record leaves only as logger, level and a code (hostile-ground
12.4); ours pass unchanged. In a fresh interpreter: logging configuration is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CNRYLOG^ZEPHYRINE"

_SCRIPT = r"""
import io, logging, sys, warnings
import structlog
from daemon.logs import configure_logging, contain_library_logs

canary = sys.argv[1]
stream = io.StringIO()
configure_logging("DEBUG", stream)
contain_library_logs()
structlog.get_logger().info("test.ours", n=1)
logging.getLogger("tifffile").warning(f"<TiffFile '{canary}.tif'> tag {canary!r}")
logging.getLogger("pydicom").error("value %s is invalid", canary)
logging.getLogger("PIL.PngImagePlugin").warning("chunk %r", canary.encode())
try:
    raise ValueError(canary)
except ValueError:
    logging.getLogger("pyarrow").exception("failed on %s", canary)
    logging.getLogger("skimage").debug("stack", stack_info=True)
warnings.warn(f"odd value {canary}", UserWarning, stacklevel=1)
sys.stdout.write(stream.getvalue())
"""


def test_library_records_lose_their_text_ours_keep_theirs() -> None:
    """Messages, arguments, tracebacks, stacks and warnings of libraries (tifffile, pydicom,
    Pillow, pyarrow, scikit-image, py.warnings) carry a canary in; none of it comes out, each
    record does, as library.record with its logger, level and code."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, CANARY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "CNRYLOG" not in done.stdout and "ZEPHYRINE" not in done.stdout
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    ours = [line for line in lines if line["event"] == "test.ours"]
    assert ours and ours[0]["n"] == 1
    library = [line for line in lines if line["event"] == "library.record"]
    assert [(r["logger"], r["level"]) for r in library] == [
        ("tifffile", "warning"),
        ("pydicom", "error"),
        ("PIL.PngImagePlugin", "warning"),
        ("pyarrow", "error"),
        ("skimage", "debug"),
        ("py.warnings", "warning"),
    ]
    for record in library:
        assert set(record) == {"event", "logger", "level", "code", "timestamp"}
        assert ":" in record["code"]
