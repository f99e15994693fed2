"""Runs only in the primary: the loop (fork, reap, events) and its policies.

Never imports fastcluster.worker_side (tests/test_quality.py enforces it); the
one crossing is the fork, handed over in fastcluster/_role.py.
"""
