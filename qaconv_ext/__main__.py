"""``python -m qaconv_ext``: the ``qaconv`` command line."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
