"""Token authentication (denseclip/ray/auth.py): where the token comes from, the private local Ray on 127.0.0.1
with a token of its own (fast); a real Ray head started with RAY_AUTH_MODE=token, and every client of ours
against it, with the token and without (slow)."""

import json
import os
import secrets
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from pipeline_scripts import load_pipeline
from ray_nodes import free_port, local_cluster

from denseclip.ray.auth import (
    TOKEN_HELP,
    ClusterAccessError,
    check_access,
    check_token,
    cluster_token,
    requires_token,
)
from denseclip.ray.labeling import ray_cluster
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture
def no_token(tmp_path, monkeypatch) -> Path:
    """No token anywhere Ray looks (an empty home, no RAY_AUTH_* variables); yields that home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return home


def test_the_token_comes_from_where_ray_reads_it(no_token, tmp_path, monkeypatch):
    assert cluster_token() is None
    (no_token / ".ray").mkdir()
    (no_token / ".ray" / "auth_token").write_text("from-home\n")
    assert cluster_token() == "from-home"
    (tmp_path / "elsewhere").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert cluster_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-variable")
    assert cluster_token() == "from-variable"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterAccessError) as refused:
        cluster_token()
    assert str(refused.value).startswith(f"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'}: cannot be read")
    assert "\n" not in str(refused.value)


def test_a_closed_tunnel_is_one_line_naming_it():
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the tunnel is not open
    with pytest.raises(ClusterAccessError) as unreachable:
        check_access(address)
    assert str(unreachable.value).startswith(f"cannot reach the Ray cluster at {address} (")
    assert "ray dashboard infra/cluster.yaml" in str(unreachable.value) and "\n" not in str(unreachable.value)


def _listening_addresses() -> set[str]:
    """The addresses that this process and all its descendants accept TCP connections on."""
    import psutil  # Ray's own copy (ray/thirdparty_files), importable once ray is

    found = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_private_local_ray_listens_on_loopback_only_and_wants_its_own_token(no_token):
    with ray_cluster():
        assert ray.get(ray.remote(lambda: 2 * 21).options(num_cpus=0.1).remote()) == 42
        gcs = ray.get_runtime_context().gcs_address
        listening = _listening_addresses()
        assert gcs.startswith("127.0.0.1:")
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        assert requires_token(gcs)  # a call without a token is refused
        assert check_token(gcs) == os.environ["RAY_AUTH_TOKEN"]  # made for it, in this process's environment only
    assert not any(name in os.environ for name in AUTH_VARIABLES)  # put back as it was
    assert not (no_token / ".ray").exists()  # nothing written to the home folder


def test_the_documented_cron_line_submits_the_label_command_through_denseclip_submit():
    cron = next(line.strip() for line in (ROOT / "docs" / "cluster.md").read_text().splitlines()
                if line.strip().startswith("0 2 * * * "))
    argv = shlex.split(cron.replace("\\%", "%").split(">>")[0])[5:]  # what cron runs, its % unescaped
    assert argv[:5] == ["docker", "exec", "denseclip", "denseclip", "submit"]  # the image installs the package
    args = load_pipeline("submit").parse_args(argv[5:])
    assert args.address == "http://127.0.0.1:8265"  # the head's dashboard, on its loopback only
    assert args.command == ["denseclip", "label", "--config", "jobs/label_bulk.yaml"]
    assert (ROOT / args.command[-1]).is_file()


# --- a real head with RAY_AUTH_MODE=token (slow) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with 2 CPUs, RAY_AUTH_MODE=token and its token. Yields (cluster, token). Like every head of
    tests/ray_nodes.py it listens on all interfaces (Ray 2.58 binds 127.0.0.1 only in its single-machine mode,
    which clients that join by address cannot reach: they resolve 127.0.0.1 to the machine's address), but it
    refuses every request without the token."""
    token = secrets.token_hex(32)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    with local_cluster(head_cpus=2, env=env) as cluster:
        yield cluster, token


def _client_env(home: Path, **variables: str) -> dict[str, str]:
    """This process's environment for a client subprocess: no RAY_AUTH_* variables but ``variables``, and
    ``home`` as its home folder (where ~/.ray/auth_token is looked for)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARIABLES}
    return {**env, "HOME": str(home), **variables}


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def _one_line_naming_the_fix(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert "RAY_AUTH_TOKEN" in lines[0] and "~/.ray/auth_token" in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_submission_with_the_token_succeeds_and_one_without_is_refused(token_head, tmp_path):
    cluster, token = token_head
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:  # Ray itself refuses the request
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30)
    assert unauthenticated.value.code == 401
    job = ["--", "python", "-c", "import ray; ray.init(); print('CPUs', ray.cluster_resources()['CPU'])"]

    empty_home = tmp_path / "empty"
    refused = _run(["pipelines/submit.py", "--address", cluster.dashboard, *job], _client_env(empty_home))
    assert refused.returncode == 2 and refused.stdout == ""
    assert _one_line_naming_the_fix(refused.stderr).startswith(
        f"submit: error: the Ray cluster at {cluster.dashboard} requires a token and none was found")
    wrong = _run(["pipelines/submit.py", "--address", cluster.gcs, *job],
                 _client_env(empty_home, RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2
    assert "refused the token from $RAY_AUTH_TOKEN" in _one_line_naming_the_fix(wrong.stderr)

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")  # as `ray get-auth-token --generate` leaves it
    for address in (cluster.dashboard, cluster.gcs):  # the dashboard, or the Ray address: the cluster names it
        done = _run(["pipelines/submit.py", "--address", address, *job], _client_env(home))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "CPUs 2.0" in done.stdout  # the job's own driver joined the cluster: the nodes pass the token on


@pytest.mark.slow
def test_every_client_without_the_token_exits_with_one_line(token_head, tmp_path, no_token, capsys):
    cluster, _ = token_head
    write_shards(seed=5, n=4, out=str(tmp_path / "shards"), shard_size=4, size=64)
    expected = f"the Ray cluster at {cluster.gcs} requires a token and none was found"

    label = load_pipeline("label").main(["--input", str(tmp_path / "shards"), "--output", str(tmp_path / "masks"),
                                         "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random",
                                         "--address", cluster.gcs])
    captured = capsys.readouterr()
    assert label == 2 and captured.out == "" and not (tmp_path / "masks").exists()
    assert _one_line_naming_the_fix(captured.err) == f"label: error: {expected}: {TOKEN_HELP}"

    spec = yaml.safe_load((ROOT / "jobs" / "train_synthetic_zero_shot.yaml").read_text())
    spec["data"].update(train=str(tmp_path / "shards"), val=str(tmp_path / "shards"))
    spec["run"].update(storage_path=str(tmp_path / "runs"))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
    train = load_pipeline("train").main(["--config", str(tmp_path / "train.yaml"), "--address", cluster.gcs])
    captured = capsys.readouterr()
    assert train == 2 and captured.out == "" and not (tmp_path / "runs").exists()
    assert _one_line_naming_the_fix(captured.err) == f"error: {expected}: {TOKEN_HELP}"

    evaluate = load_pipeline("evaluate").main(["--input", str(tmp_path / "shards"), "--classes", "synthetic",
                                               "--model", "denseclip-tiny-shapes", "--ray", "--address", cluster.gcs,
                                               "--output", str(tmp_path / "evaluation")])
    captured = capsys.readouterr()
    assert evaluate == 2 and captured.out == "" and not ray.is_initialized()
    assert not (tmp_path / "evaluation").exists()
    assert _one_line_naming_the_fix(captured.err) == f"error: {expected}: {TOKEN_HELP}"

    reproduce = load_pipeline("reproduce").main(["--config", str(_tiny_reproduction(tmp_path)), "--stages",
                                                 "prepare", "--address", cluster.dashboard])
    captured = capsys.readouterr()
    assert reproduce == 2 and captured.out == "" and not (tmp_path / "work").exists()
    assert _one_line_naming_the_fix(captured.err).startswith(
        f"reproduce: error: the Ray cluster at {cluster.dashboard} requires a token")


def _tiny_reproduction(tmp_path: Path) -> Path:
    """jobs/reproduce_synthetic_zero_shot.yaml with its workdir under ``tmp_path`` and a world of 8 + 4 scenes."""
    spec = yaml.safe_load((ROOT / "jobs" / "reproduce_synthetic_zero_shot.yaml").read_text())
    spec.update(workdir=str(tmp_path / "work"), prepare={"synthetic": {
        "train": {"seed": 7, "num_images": 8, "shard_size": 4}, "val": {"seed": 1, "num_images": 4, "shard_size": 4}}})
    path = tmp_path / "reproduce.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_with_the_token_reproduce_runs_a_stage_and_label_drives_the_cluster(token_head, tmp_path):
    cluster, token = token_head
    stage = _run(["pipelines/reproduce.py", "--config", str(_tiny_reproduction(tmp_path)), "--stages", "prepare",
                  "--address", cluster.dashboard], _client_env(tmp_path, RAY_AUTH_TOKEN=token))
    assert stage.returncode == 0, stage.stdout[-3000:] + stage.stderr[-3000:]
    assert "reproduce: prepare: done" in stage.stdout and "wrote 8 scenes in 2 shards" in stage.stdout
    assert len(list((tmp_path / "work").rglob("*.tar"))) == 3

    # A driver outside the cluster (the client is not in Ray's token mode: label.py switches it on).
    write_shards(seed=6, n=8, out=str(tmp_path / "shards"), shard_size=4, size=64)
    label = _run(["pipelines/label.py", "--input", str(tmp_path / "shards"), "--output", str(tmp_path / "masks"),
                  "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "4", "--address",
                  cluster.gcs], _client_env(tmp_path, RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1"))
    assert label.returncode == 0, label.stdout[-3000:] + label.stderr[-3000:]
    summary = json.loads((tmp_path / "masks" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["images_labelled"] == 8
