"""The run directory's copy of the job file resolves its paths as the original did."""

import yaml

from coordinator.run_dir import create_run_dir
from swarm.config import load_job


def test_relative_model_and_data_paths_still_point_at_the_same_files_from_the_run_directory(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "jobs" / "data.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
    job_file = tmp_path / "jobs" / "job.yaml"
    job_file.write_text(yaml.safe_dump({"name": "j", "model": {"path": "../models/m"}, "training": {"steps": 1},
                                        "data": {"source": "jsonl", "path": "data.jsonl"}}))
    run_dir = create_run_dir(tmp_path / "runs", "j", job_file)
    original, copied = load_job(job_file), load_job(run_dir / "job.yaml")
    assert copied.model.path == original.model.path == (tmp_path / "models" / "m").resolve()
    assert copied.data.path == original.data.path


def test_a_relative_start_adapter_still_points_at_the_same_directory_from_the_run_directory(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "earlier" / "adapter").mkdir(parents=True)
    job_file = tmp_path / "jobs" / "job.yaml"
    job_file.write_text(yaml.safe_dump({"name": "j", "model": {"preset": "llama-micro", "adapter": "../earlier/adapter"},
                                        "training": {"steps": 1}}))
    run_dir = create_run_dir(tmp_path / "runs", "j", job_file)
    original, copied = load_job(job_file), load_job(run_dir / "job.yaml")
    assert copied.model.adapter == original.model.adapter == (tmp_path / "earlier" / "adapter").resolve()


def test_a_job_file_without_relative_paths_is_kept_verbatim_comments_and_all(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("# my experiment\nname: j\nmodel: {preset: llama-micro}\ntraining: {steps: 1}\n")
    run_dir = create_run_dir(tmp_path / "runs", "j", job_file)
    assert (run_dir / "job.yaml").read_text() == job_file.read_text()
