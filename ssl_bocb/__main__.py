"""``python -m ssl_bocb <command>``: the same as the ``ssl-bocb`` console script."""
from ssl_bocb.cli.main import main

if __name__ == "__main__":
    main()
