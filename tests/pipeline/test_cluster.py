"""The README's cluster recipe on this machine: a real two-node Ray cluster, `ray job submit` of
`fssd train` with a runtime env, checkpoints in S3 (moto's server), metrics in an `mlflow server`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd, env, timeout=180):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture
def two_node_cluster(free_port):
    """`ray start --head` plus a second `ray start --address` node, 1 CPU each, on 127.0.0.1.

    Torn down by killing only the processes of this cluster (its own temp dir), so other Ray
    instances of the test session keep running."""
    # Each node gets its own temp dir: nodes sharing one would share (and garbage-collect) the
    # runtime_resources directory that holds the job's working_dir.
    temps = [tempfile.mkdtemp(prefix="rc", dir="/tmp") for _ in range(2)]
    port, dash = free_port(), free_port()
    # Exactly the README's set-up, no more: the venv's bin on PATH (`source .venv/bin/activate`),
    # RAY_AUTH_MODE=token on every "machine" (head, worker, submitter: here one environment) and
    # the token in ~/.ray/auth_token, made by `ray get-auth-token --generate` (all nodes share it here).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # nothing from the outside
        env.pop(var, None)
    if not (Path.home() / ".ray" / "auth_token").is_file():
        _run([BIN / "ray", "get-auth-token", "--generate"], env)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]

    def node_ports():  # two nodes on one host must not share their agents' default ports
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    try:
        _run([BIN / "ray", "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
              "--dashboard-port", str(dash), "--include-dashboard", "true", *node_ports(), *common, "--temp-dir", temps[0]], env)
        _run([BIN / "ray", "start", "--address", f"127.0.0.1:{port}", *node_ports(), *common, "--temp-dir", temps[1]],
             env)
        alive = _run([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
                      "print(sorted(n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']))"], env)
        assert alive.stdout.strip().splitlines()[-1] == "[1.0, 1.0]", alive.stdout
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(t in part for t in temps for part in (proc.info["cmdline"] or [])):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def test_cluster_recipe_two_nodes_s3_checkpoints_mlflow_server(
        two_node_cluster, tiny_data, tmp_path, make_params, moto_endpoint, fake_aws_env, mlflow_server):
    import boto3
    import mlflow

    bucket = "fssd-cluster"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id=fake_aws_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=fake_aws_env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    params = make_params(tmp_path / "params.yaml", tiny_data, tmp_path,
                         **{"train.epochs": 1, "train.num_workers": 2, "train.cpus_per_worker": 1,
                            "train.freeze_bn": True, "train.use_tuned": False})
    out_metrics, out_model = tmp_path / "train.json", tmp_path / "fssd.pt"
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "mlartifacts", tmp_path,
                       two_node_cluster["env"]) as tracking_uri:
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "AWS_ENDPOINT_URL": moto_endpoint,
                                    **fake_aws_env}}
        cmd = [BIN / "ray", "job", "submit", "--address", two_node_cluster["dashboard"], "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env),
               "--", "fssd", "train", "--params", str(params), "--metrics-out", str(out_metrics),
               "--model-out", str(out_model), "--set", f"train.storage_path=s3://{bucket}/fssd/ray_results"]
        for _ in range(30):  # the head's job agent needs a moment after `ray start`
            out = subprocess.run(cmd, env=two_node_cluster["env"], capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in out.stderr + out.stdout:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        log = out.stdout + out.stderr
        assert "succeeded" in log, log[-3000:]
        # one worker on each node
        assert "world_rank=0" in log and "world_rank=1" in log, log[-3000:]
        # Ray numbers node_rank by IP and both nodes are 127.0.0.1; the workers still sit on two
        # Ray nodes: each node has 1 CPU and each worker takes 1 CPU (checked in the fixture).
        metrics = json.loads(out_metrics.read_text())
        assert metrics["epochs"] == 1 and out_model.is_file()

        # checkpoints went to S3, under the run's name, and not to the local default
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="fssd/ray_results/").get("Contents", [])]
        assert any(k.startswith(f"fssd/ray_results/{metrics['run_name']}/") and k.endswith("/checkpoint.pt") for k in keys), keys
        assert not (tmp_path / "ray_results" / "train").exists()

        # the run is on the tracking server (through its REST API), checkpoint artifact included
        client = mlflow.MlflowClient(tracking_uri)
        run = client.get_run(metrics["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["train.num_workers"] == "2"
        assert "loss" in run.data.metrics
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/fssd.pt"]
    assert not (tmp_path / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won over params' sqlite store
