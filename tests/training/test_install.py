"""A regular (non-editable) install carries the config tree: ``lcv-train`` composes from any directory."""

import subprocess
import sys
import zipfile

from tests.training._runs import REPO


def test_wheel_contains_conf_and_runs_from_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (wheel,) = wheels.glob("lcv_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conf/train.yaml" in names and "conf/model/longcat-13.6b.yaml" in names
    assert {n.split("/")[0] for n in names} >= {"lcv_train", "parallel", "kernels", "data_loaders", "conf"}
    assert not any(n.startswith("tests/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, lcv_train; assert lcv_train.__file__.startswith(sys.argv[1]), lcv_train.__file__; "
            "sys.argv = ['lcv-train', '--cfg', 'job', 'model=small']; from lcv_train.cli import train_main; train_main()")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "hidden_size: 256" in p.stdout
