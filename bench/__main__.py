"""`python -m bench`: the load harness of bench/run.py (see `python -m bench --help`)."""

from bench.run import run

run()
