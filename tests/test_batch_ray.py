"""``ldmkit batch --ray``: Ray Data in local mode gives the local backend's images and manifest hashes; without
Ray installed, one line says how to get it."""

from __future__ import annotations

import sys

import pytest
from test_batch import JOBS, write_jobs

from ldmkit import cli
from ldmkit.batch import file_sha256, manifest_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--ray", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'ldmkit[ray]'" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err


@pytest.mark.slow  # a local Ray cluster and two workers that each import torch and load the model: 20-60 s
def test_ray_local_mode_equals_the_local_backend(tmp_path, capsys):
    pytest.importorskip("ray.data", reason="Ray is an optional extra: pip install 'ldmkit[ray]'")
    import ray

    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "local")]) == 0
    ray.init(num_cpus=2, include_dashboard=False)  # each worker: 1 CPU, 1 thread, as this process
    try:
        assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    local, remote = (sorted(manifest_rows(tmp_path / d), key=lambda r: (r["line"], r["index"]))
                     for d in ("local", "ray"))
    fields = ("line", "index", "file", "seed", "sha256", "job")
    assert [[r[k] for k in fields] for r in remote] == [[r[k] for k in fields] for r in local]
    assert len(local) == sum(j.get("batch_size", 1) for j in JOBS)
    for r in remote:
        assert file_sha256(tmp_path / "ray" / r["file"]) == r["sha256"]
        assert (tmp_path / "ray" / r["file"]).read_bytes() == (tmp_path / "local" / r["file"]).read_bytes()
    capsys.readouterr()
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "ray"), "--ray"]) == 0  # nothing left to do
    assert f"{len(JOBS)} already done, 0 to run" in capsys.readouterr().err
