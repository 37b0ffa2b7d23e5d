"""vrex.cluster on a real local Ray cluster (127.0.0.1, 2 CPUs): sessions routed to engine actors
compute what they compute alone; an actor that dies is reported to its sessions' clients.

One test on purpose: Ray and two model-loading actors start once (~15 s on 2 cores), and the
test's last part kills an actor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from cluster_helpers import CONFIG, alone, texts
from PIL import Image

from vrex.cluster import Cluster, ClusterStepError, SessionError, SessionLost
from vrex.io import assets_dir


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    root = assets_dir()
    if root is None:
        pytest.fail("shared test media not found (set VREX_ASSETS to the assets folder)")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "horse.png", "parrot.jpg", "owl.jpg"]
    return [Image.open(Path(root) / "images" / n).convert("RGB") for n in names]


def test_sessions_on_ray_actors(videollm, photos):
    frames = {"full": [(0.5 * i, photos[i]) for i in range(3)], "resv": [(0.5 * i, photos[i + 3]) for i in range(3)]}
    with Cluster(actors=2, num_cpus=2, cpus_per_actor=1, threads=1, connector=None) as cluster:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        a = cluster.open_session("full", **CONFIG)
        b = cluster.open_session("resv", **CONFIG)
        assert a.where["pid"] != b.where["pid"]  # one session per actor: routed to the least loaded
        got = {"full": a.push_frame(*frames["full"][0]), "resv": b.push_frame(*frames["resv"][0])}
        for i in (1, 2):  # then both frames in one call (each actor steps its own)
            for s, events in cluster.step({a: frames["full"][i], b: frames["resv"][i]}).items():
                got["full" if s is a else "resv"] += events
        got["full"] += a.ask("What do you see?")
        got["resv"] += b.ask("What do you see?")
        for policy, events in got.items():
            ref = alone(videollm, policy, frames[policy])
            assert texts(events) == texts(ref), policy
            p = [e["stats"]["p_interval"] for e in events if e["kind"] == "frame"]
            assert p == pytest.approx([e["stats"]["p_interval"] for e in ref if e["kind"] == "frame"], abs=1e-4)
        assert a.memory()["kv_bytes"] > 0

        ray.kill(a._actor, no_restart=True)  # the process holding session a dies
        with pytest.raises(SessionLost, match=r"session 's0' is lost: its actor .*pid \d+.* died.*open a new session"):
            a.push_frame(2.0, photos[0])
        with pytest.raises(SessionError, match="does not save sessions"):
            a.restart()
        with pytest.raises(ClusterStepError) as info:
            cluster.step({a: (2.5, photos[1]), b: (1.5, photos[2])})
        assert set(info.value.errors) == {a} and info.value.results[b][0]["kind"] == "frame"
        c = cluster.open_session("full", **CONFIG)  # new sessions go to the live actor
        assert c.where["pid"] == b.where["pid"]
        assert c.push_frame(0.0, photos[0])[0]["stats"]["stream"] == c.id
