"""``python -m engine`` is the same as the ``aitbc-engine`` command."""

from engine.cli import main

raise SystemExit(main())
