"""Extra real training media from a Debian package: the example data of ``opencv-doc``.

OpenCV's documentation package carries some 40 photos and a few clips of ordinary subjects (fruit,
a squirrel, a potted plant, a street, a football player, an animated film) next to its test patterns.
``vrex train --extra-media vrex/train/media-opencv-doc.json`` adds the nameable ones to the training
subjects. They are fetched once with ``apt-get download`` (Debian's registry, ~96 MB) into vrex's
cache; nothing of them is stored in the repository. Only training reads them: the evaluation
media stay those of ``media.json``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from vrex.models.weights import cache_dir

PACKAGE = "opencv-doc"
#: the examples folder inside the package
EXAMPLES = Path("usr/share/doc/opencv-doc/examples")


def opencv_doc_examples() -> Path:
    """The opencv-doc examples folder in vrex's cache, downloaded and unpacked on first use."""
    root = cache_dir() / "debian" / PACKAGE
    done = root / ".complete"
    if done.is_file():
        return root / EXAMPLES
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"the extra training media come from Debian's {PACKAGE} package, and '{tool}' is not "
                                    f"on this machine; unpack that package's {EXAMPLES} into {root / EXAMPLES} and "
                                    f"create {done} by hand")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        got = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if got.returncode != 0 or not debs:
            raise FileNotFoundError(f"apt-get download {PACKAGE} failed: {got.stderr.strip() or got.stdout.strip()}")
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        if root.exists():
            shutil.rmtree(root)
        (root / EXAMPLES).parent.mkdir(parents=True)
        shutil.move(str(unpacked / EXAMPLES), str(root / EXAMPLES))
        done.write_text(debs[0].name + "\n")
    return root / EXAMPLES
