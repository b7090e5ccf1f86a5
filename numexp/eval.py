"""``python -m numexp.eval RUN ...``: the same command as ``numexp eval`` (see :mod:`numexp.evaluate`)."""
import sys

from numexp.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
