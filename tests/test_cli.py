"""`peer join` on bad input: one readable line, exit code 2, no traceback, nothing damaged."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures_swarm import REPO, peer_env


def run_peer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
        cwd=REPO,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture
def wallet(tmp_path):
    from peer.chain.wallet import WalletConfig, create_wallet

    path = tmp_path / "wallets"
    create_wallet(WalletConfig(name="w", hotkey="h", path=str(path)))
    return ["--wallet.path", str(path), "--wallet.name", "w", "--wallet.hotkey", "h", "--no-chain"]


def test_help_reads_well():
    proc = run_peer("join", "--help")
    assert proc.returncode == 0
    for flag in (
        "--config",
        "--wallet.name",
        "--initial-peers",
        "--host-maddrs",
        "--announce-maddrs",
        "--run-id",
        "--max-rounds",
        "--device",
        "--wandb.mode",
        "--averaging",
        "--optimizer",
        "--behaviour",
    ):
        assert flag in proc.stdout


def test_unknown_flag():
    assert_user_error(run_peer("join", "--nope"), "--nope")


def test_unknown_model_config(wallet):
    assert_user_error(run_peer("join", "--config", "gpt-17", *wallet), "gpt-17", "shipped")


def test_malformed_config_file(tmp_path, wallet):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: [\n")
    assert_user_error(run_peer("join", "--config", str(bad), *wallet), "not valid YAML")


def test_bad_multiaddr(wallet):
    assert_user_error(run_peer("join", "--initial-peers", "not-an-address", *wallet), "not a valid multiaddr")
    assert_user_error(run_peer("join", "--initial-peers", "/ip4/127.0.0.1/tcp/4000", *wallet), "/p2p/")


def test_missing_wallet(tmp_path):
    last = assert_user_error(
        run_peer("join", "--wallet.path", str(tmp_path), "--wallet.name", "ghost"), "ghost"
    )
    assert "--wallet.create" in last


def join_locally(tmp_path, debug_data, wallet, run_id: str, *flags: str) -> subprocess.CompletedProcess:
    """``peer join`` with a home under ``tmp_path``, the debug data and a loopback address, plus ``flags``."""
    return run_peer(
        *("join", "--run-id", run_id, "--home", str(tmp_path / "h"), "--data-dir", str(debug_data)),
        *("--host-maddrs", "/ip4/127.0.0.1/tcp/0", *flags, *wallet),
    )


def test_bad_run_id(tmp_path, wallet, debug_data):
    assert_user_error(join_locally(tmp_path, debug_data, wallet, "a.b/c"), "--run-id")


def test_bf16_on_a_cpu_is_refused(tmp_path, wallet, debug_data):
    """bf16 autocast is the GPU default (``--precision auto``); asked for on a CPU it is a user error."""
    proc = join_locally(tmp_path, debug_data, wallet, "bf16-cpu", "--device", "cpu", "--precision", "bf16")
    assert_user_error(proc, "--precision bf16", "--precision fp32")


@pytest.mark.slow
def test_unreachable_bootstrap_peer(tmp_path, wallet, debug_data):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWBeG1iFi9JREmtVrBkDF7vhbsrzfHjiGa32ZkCfntSiUK"
    proc = run_peer(
        "join",
        "--initial-peers",
        dead,
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--home",
        str(tmp_path / "h"),
        "--data-dir",
        str(debug_data),
        *wallet,
    )
    assert_user_error(proc, "could not join the DHT", "--initial-peers")


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path, wallet, debug_data):
    home = tmp_path / "h"
    ckpt = home / "checkpoint" / "state.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00garbage" * 10)
    before = ckpt.read_bytes()
    proc = run_peer(
        "join",
        "--home",
        str(home),
        "--data-dir",
        str(debug_data),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--max-rounds",
        "1",
        *wallet,
    )
    assert_user_error(proc, "corrupt", "delete")
    assert ckpt.read_bytes() == before  # nothing overwritten


def test_missing_subnet_on_the_local_ledger(tmp_path, wallet):
    flags = [f for f in wallet if f != "--no-chain"]
    proc = run_peer(
        "join",
        "--ledger.path",
        str(tmp_path / "ledger.sqlite"),
        "--netuid",
        "3",
        "--home",
        str(tmp_path / "h"),
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        *flags,
    )
    assert_user_error(proc, "subnet 3 does not exist", "peer chain create-subnet")


def test_behaviour_refused_on_a_real_network(wallet):
    flags = [f for f in wallet if f != "--no-chain"]
    proc = run_peer("join", "--behaviour", "free-rider", "--subtensor.network", "finney", *flags)
    assert_user_error(proc, "refused on a real network")


def test_peer_help_lists_every_subcommand():
    proc = run_peer("--help")
    assert proc.returncode == 0
    for command in ("join", "bootstrap", "fetch", "status", "chain"):
        assert f"    {command} " in proc.stdout or f"    {command}\n" in proc.stdout, command
    proc = run_peer("chain", "--help")
    assert proc.returncode == 0
    for sub in ("create-subnet", "fund", "register", "stake", "metagraph", "advance", "password-env"):
        assert sub in proc.stdout
    assert_user_error(run_peer("chain", "nope"), "invalid choice: 'nope'")
    assert_user_error(run_peer("chian"), "invalid choice: 'chian'", "'chain'")


def test_a_subcommand_imports_only_its_module():
    """`peer chain …` must not pay for torch/hivemind (seconds) that other subcommands import."""
    code = (
        "import sys; from peer.cli import build_parser; p = build_parser('chain'); "
        "p.parse_args(['chain', 'metagraph']); "
        "print(sorted(m for m in ('torch', 'hivemind', 'peer.join') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=peer_env(), cwd=REPO
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_the_validator_never_imports_hivemind():
    """The validator speaks py-libp2p; hivemind's protobufs in the same process break libp2p's import
    (duplicate symbol 'crypto.pb.KeyType'). Every validator module, loaded together, leaves it out."""
    code = (
        "import sys, validator.cli, validator.loop, validator.evaluation, validator.replay, "
        "validator.scoring, validator.sampling, peer.training.sparse, peer.net.fetch; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hivemind'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=peer_env(), cwd=REPO
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr[-2000:])


def test_precision_resolves_per_device(tmp_path):
    from peer.config import load_run_config
    from peer.errors import ConfigError
    from peer.training.trainer import TrainerConfig

    def cfg(**kw):
        return TrainerConfig(run=load_run_config("debug"), run_id="p", home=tmp_path, data_dir=tmp_path, **kw)

    assert cfg(device="cpu").bf16 is False  # auto on a CPU: fp32
    assert cfg(device="cpu", precision="fp32").bf16 is False
    assert cfg(device="cuda", precision="bf16").bf16 is True  # asked for explicitly
    assert cfg(device="cuda", precision="fp32").bf16 is False
    for bad, why in (
        ({"device": "cpu", "precision": "bf16"}, "needs a GPU"),
        ({"precision": "fp16"}, "auto, bf16"),
    ):
        with pytest.raises(ConfigError, match=why):
            cfg(**bad)
