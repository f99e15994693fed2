"""Runs only in a worker: its runtime, the child's start (boot), the intake
of connections from the primary, and the beating half of hang detection.

Never imports fastcluster.primary (tests/test_quality.py enforces it). Not
named `worker`: fastcluster.worker is the public cluster.worker.
"""
