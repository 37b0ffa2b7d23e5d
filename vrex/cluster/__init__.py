"""Live sessions as Ray actors (issue 20): ``Cluster``, ``RemoteSession``; see ``vrex.cluster.client``.
Needs Ray (``requirements.lock`` pins it; the ``cluster`` extra)."""

from vrex.cluster.client import Cluster, ClusterStepError, RemoteSession, SessionError, SessionLost

__all__ = ["Cluster", "ClusterStepError", "RemoteSession", "SessionError", "SessionLost"]
