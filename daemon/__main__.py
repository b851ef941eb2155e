# Before anything else: a SIGTERM during the imports below must drain the service, not kill it.
import sys

from daemon.signals import capture_early, release_early

capture_early()

from daemon.cli import main  # noqa: E402

if "run" not in sys.argv[1:]:
    release_early()
raise SystemExit(main())
