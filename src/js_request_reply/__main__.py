"""`python -m js_request_reply`: the command line."""

from .cli import main

raise SystemExit(main())
