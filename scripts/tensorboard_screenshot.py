"""Screenshot TensorBoard showing a relumon run, with headless Chromium (Debian's `chromium` package).

It writes the ReLU story's runs (or uses --logdir), starts `tensorboard` on a free port on 127.0.0.1, waits until the
run is served, and saves one PNG per dashboard: the custom-scalars layout relumon writes, and the images (the
gradient-flow chart and the dead-unit heatmap).

    apt-get install chromium
    python scripts/tensorboard_screenshot.py --out docs/img
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DASHBOARDS = {
    "tensorboard_custom_scalars.png": "#custom_scalars&_smoothingWeight=0",
    "tensorboard_images.png": "#images",
    "tensorboard_scalars.png": "#timeseries",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(base: str, server: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("tensorboard exited early")
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as response:
                if json.loads(response.read()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("tensorboard served no run in time")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, default=None, help="default: write the ReLU story's dying-ReLU runs")
    parser.add_argument("--out", type=Path, default=Path("docs") / "img")
    parser.add_argument("--size", default="1400,1000")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    logdir = args.logdir
    if logdir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        import relu_story

        logdir = Path(tempfile.mkdtemp()) / "relu_story"
        relu_story.main(["--logdir", str(logdir)])
        logdir = logdir / "2_dying"
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shots = []
    try:
        wait_for_runs(base, server)
        with tempfile.TemporaryDirectory() as profile:
            for name, fragment in DASHBOARDS.items():
                target = args.out / name
                subprocess.run(
                    [
                        chromium,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--user-data-dir={profile}",
                        f"--window-size={args.size}",
                        "--virtual-time-budget=20000",
                        f"--screenshot={target.resolve()}",
                        f"{base}/{fragment}",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                shots.append(target)
                print(f"wrote {target}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return shots


if __name__ == "__main__":
    main()
