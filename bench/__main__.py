"""Entry point of ``python -m bench``; see :mod:`bench.run` for the options."""

from bench.run import main

raise SystemExit(main())
