"""What the primary and its workers share: frames and channels, settings,
addresses, events, errors, the Worker handle, listeners.

Imports neither fastcluster.primary nor fastcluster.worker_side.
"""
