"""A validator round against a subnet where every peer but one is hostile (real publishers, real ledger).

Each peer is a real py-libp2p publisher process serving an outbox with hotkey-signed manifests, its address
committed on a LocalLedger; the validator is the real `validator run` process. Hostile peers:

* ``stall``         serves θ_r and a Δ, but stops every blob half way and keeps the stream open
* ``trickle``       serves θ_r and a Δ in 1 KiB frames every 0.5 s (never slow enough for a per-frame timeout)
* ``stall-listing`` accepts the connection and never answers the listing
* ``garbage``       a validly signed manifest naming random bytes
* ``huge-decl``     a validly signed manifest declaring a 12 GiB Δ (under the fetch limit, far over the model's)
* ``huge-shapes``   a well-formed safetensors container whose header declares enormous shapes
* ``bad-meta``      a real Δ's tensors with delta metadata that declares shapes they do not fill

The round must finish within its fetch deadline plus the evaluation, score the honest peer > 0 and every
hostile one 0 with a recorded reason, and set weights on the ledger. A second test kills the validator
(SIGKILL) in the middle of a round and shows the restarted one finishes that round, without sending the
weights of a round twice.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from substrateinterface import Keypair

from peer.chain import SubnetParams
from peer.chain.local import LocalLedger
from peer.net.outbox import Outbox, encode_delta, encode_state, sha256_hex
from peer.net.records import BlobRef, ContributionManifest, StateManifest
from tests.fixtures_validator import ROUND_BLOCKS, keypair, run_validators, validator_world  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
TAO = 10**9
FETCH_DEADLINE = 12.0


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        GRADSWARM_TEST_FAULTS="1",
    )


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def hostile_blob(kind: str, w, rng) -> bytes:
    if kind == "garbage":
        return rng.randbytes(200_000)
    if kind == "huge-shapes":  # 16 bytes of data under a header that declares a 2^40-element tensor
        return _safetensors(
            {
                "__metadata__": {"format": "gradswarm-delta-int8-blockwise", "block": "256", "shapes": "{}"},
                "w::q": {"dtype": "I8", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]},
            },
            bytes(16),
        )
    if kind == "bad-meta":  # real tensors, metadata claiming every tensor is 2^32 elements
        blob = encode_delta(w.deltas[1]["hk-honest-b"])
        n = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + n])
        shapes = json.loads(header["__metadata__"]["shapes"])
        header["__metadata__"]["shapes"] = json.dumps({k: [1 << 16, 1 << 16] for k in shapes})
        return _safetensors(header, blob[8 + n :])
    raise AssertionError(kind)


def write_peer(
    w, name: str, outbox: Path, run_id: str, peer_id: str, *, blob: bytes | None, declared: int | None = None
):
    """θ_1 and a contribution for round 1 (none if ``blob`` is None), manifests signed by ``name``'s hotkey."""
    from peer.data.model import hash_tensors
    from peer.data.pages import assign_pages

    kp = keypair(name)
    base = w.bases[1]
    base_hash = hash_tensors(base.items())
    state_blob = encode_state(base)
    box = Outbox(outbox)
    sm = StateManifest(
        run_id=run_id, round=1, hotkey=kp.ss58_address, peer_id=peer_id, state_hash=base_hash,
        model_config_name=w.run.name,
        blob=BlobRef(name="state.safetensors", sha256=sha256_hex(state_blob), size=len(state_blob)),
    )  # fmt: skip
    box.write_state(1, state_blob, json.loads(sm.signed(kp).model_dump_json()))
    if blob is None:
        return
    pages = assign_pages(kp.ss58_address, 1, w.seeds[1], w.store.train_pages, w.run.data.pages_per_round)
    cm = ContributionManifest(
        run_id=run_id, round=1, hotkey=kp.ss58_address, peer_id=peer_id, base_state_hash=base_hash,
        data_fingerprint=w.store.fingerprint, model_config_name=w.run.name, pages=pages, samples=320,
        tokens=20480, inner_steps=40, loss_before=None, loss_after=None,
        blob=BlobRef(name="contribution.safetensors", sha256=sha256_hex(blob), size=declared or len(blob)),
        behaviour=name,
    )  # fmt: skip
    box.write_contribution(1, blob, json.loads(cm.signed(kp).model_dump_json()))


def make_validator(path: Path, ledger: LocalLedger, netuid: int, coldkey: Keypair) -> Keypair:
    from peer.chain.wallet import WalletConfig, create_wallet

    kp = create_wallet(WalletConfig(name="val", hotkey="default", path=str(path), create=True))
    ledger.register(netuid, kp, coldkey)
    ledger.add_stake(netuid, kp.ss58_address, coldkey, 100 * TAO)
    return kp


def _validator_hotkey(tmp_path: Path) -> str:
    from peer.chain.wallet import WalletConfig, load_hotkey

    return load_hotkey(
        WalletConfig(name="val", hotkey="default", path=str(tmp_path / "wallets"))
    ).ss58_address


def validator_cmd(w, run_id, state, netuid, wallets, *extra) -> list[str]:
    return [
        sys.executable, "-m", "validator.cli", "run", "--config", str(w.config_path), "--data-dir", str(w.data_dir),
        "--run-id", run_id, "--state-dir", str(state), "--ledger.path", str(w.ledger_path),
        "--netuid", str(netuid), "--round-blocks", str(ROUND_BLOCKS), "--max-rounds", "1",
        "--publish-grace", "0", "--wallet.name", "val", "--wallet.path", str(wallets), "--device", "cpu",
        "--eval.fetch-deadline", str(FETCH_DEADLINE), *extra,
    ]  # fmt: skip


class Subnet:
    """A subnet on the fixture world's ledger with one publisher process per named peer."""

    def __init__(self, w, tmp_path: Path, run_id: str, rate_limit: int = 0):
        self.w, self.tmp, self.run_id = w, tmp_path, run_id
        self.ledger = LocalLedger(w.ledger_path)
        owner, self.coldkey = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
        self.ledger.fund(self.coldkey.ss58_address, 10_000 * TAO)
        self.netuid = self.ledger.create_subnet(owner, SubnetParams(burn=0, weights_rate_limit=rate_limit))
        self.uids: dict[str, int] = {}
        self.handles = []

    def add(
        self, name: str, blob: bytes | None, *, fault: str | None = None, declared: int | None = None
    ) -> None:
        from peer.chain.membership import ensure_commitment
        from peer.net.identity import load_or_create_identity
        from peer.net.publisher import PublisherConfig, start_publisher

        self.uids[name] = self.ledger.register(self.netuid, keypair(name), self.coldkey).uid
        home = self.tmp / "peers" / name
        home.mkdir(parents=True)
        peer_id = load_or_create_identity(home / "identity.key")
        write_peer(self.w, name, home / "outbox", self.run_id, peer_id, blob=blob, declared=declared)
        old = os.environ.get("GRADSWARM_TEST_FAULTS")
        os.environ["GRADSWARM_TEST_FAULTS"] = "1"
        try:
            h = start_publisher(home / "outbox", home / "identity.key", cfg=PublisherConfig(fault=fault))
        finally:
            if old is None:
                os.environ.pop("GRADSWARM_TEST_FAULTS", None)
        self.handles.append(h)
        h.publish_identity(keypair(name), run_id=self.run_id, round_=1)
        ensure_commitment(self.ledger, self.netuid, keypair(name), h.commitment())

    def close(self) -> None:
        for h in self.handles:
            h.stop()
        self.ledger.close()


def hostile_subnet(w, tmp_path: Path) -> Subnet:
    import random

    rng = random.Random(7)
    net = Subnet(w, tmp_path, f"vhostile-{uuid.uuid4().hex[:8]}")
    honest_b = encode_delta(w.deltas[1]["hk-honest-b"])
    # hostile peers first: they hold the lowest uids (and are the first voters for θ_r)
    net.add("stall", honest_b, fault="stall")
    net.add("trickle", encode_delta(w.deltas[1]["hk-honest-c"]), fault="trickle")
    net.add("stall-listing", honest_b, fault="stall-listing")
    net.add("garbage", hostile_blob("garbage", w, rng))
    net.add("huge-decl", rng.randbytes(4096), declared=12 << 30)
    net.add("huge-shapes", hostile_blob("huge-shapes", w, rng))
    net.add("bad-meta", hostile_blob("bad-meta", w, rng))
    net.add("hk-honest-a", encode_delta(w.deltas[1]["hk-honest-a"]))
    return net


def _advance_past_round_1(ledger: LocalLedger) -> None:
    ledger.advance(max(0, 2 * ROUND_BLOCKS + 5 - ledger.block()))  # round 2 is running: round 1 has ended


@pytest.mark.slow
def test_a_round_survives_a_subnet_of_hostile_peers(validator_world, tmp_path):  # noqa: F811
    w = validator_world
    net = hostile_subnet(w, tmp_path)
    try:
        make_validator(tmp_path / "wallets", net.ledger, net.netuid, net.coldkey)
        _advance_past_round_1(net.ledger)
        state = tmp_path / "state"
        t0 = time.monotonic()
        (proc,) = run_validators(
            [validator_cmd(w, net.run_id, state, net.netuid, tmp_path / "wallets")], w.ledger_path,
            cwd=REPO, env=_env(),
        )  # fmt: skip
        wall = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = json.loads((state / "rounds" / "1" / "record.json").read_text())
        # the fetch step kept to its deadline (+ slack for the load of a shared 2-core box)
        assert rec["timings"]["fetch_s"] < FETCH_DEADLINE + 5, rec["timings"]
        assert rec["timings"]["round_s"] < FETCH_DEADLINE + 60, rec["timings"]
        scores = {s["uid"]: s for s in rec["scores"]}
        explained = {n: (scores[u]["score"], scores[u]["reason"]) for n, u in net.uids.items()}
        assert scores[net.uids["hk-honest-a"]]["score"] > 0, explained
        for name, uid in net.uids.items():
            if name == "hk-honest-a":
                continue
            assert scores[uid]["score"] == 0 and scores[uid]["reason"] not in ("", "scored"), explained
        reasons = {n: r for n, (_, r) in explained.items()}
        assert "deadline" in reasons["stall"] or "timeout" in reasons["stall"], reasons
        assert "deadline" in reasons["trickle"] or "timeout" in reasons["trickle"], reasons
        assert "deadline" in reasons["stall-listing"] or "timeout" in reasons["stall-listing"], reasons
        # refused by the model's size before any byte moves (the fetch client's limit or the loop's check)
        assert "limit" in reasons["huge-decl"] or "at most" in reasons["huge-decl"], reasons
        for n in ("garbage", "huge-shapes", "bad-meta"):
            assert "fetch" in reasons[n] or "malformed" in reasons[n], reasons
        assert [o["action"] for o in rec["weights"]["outcomes"]] == ["set"], rec["weights"]
        weights = dict(
            net.ledger.weights(net.netuid)[net.ledger.uid_of(net.netuid, _validator_hotkey(tmp_path))]
        )
        assert weights.get(net.uids["hk-honest-a"], 0) > 0
        assert all(weights.get(u, 0) == 0 for n, u in net.uids.items() if n != "hk-honest-a"), weights
        print(f"hostile round: {wall:.1f}s wall, timings {rec['timings']}")
    finally:
        net.close()


@pytest.mark.slow
def test_a_sampled_round_lists_only_the_sample_and_replaces_peers_with_nothing_to_evaluate(
    validator_world,  # noqa: F811
    tmp_path,
):
    """K = 2 of 6 peers, 3 of which publish θ_1 but no Δ: the validator lists the sample (no vote extras),
    refuses a sampled peer with nothing to evaluate and draws again, so it evaluates 2 honest peers and
    never lists the peers left out — listing does not grow with the subnet."""
    w = validator_world
    net = Subnet(w, tmp_path, f"vsample-{uuid.uuid4().hex[:8]}")
    try:
        for name in ("empty-1", "empty-2", "empty-3"):
            net.add(name, None)
        for name in ("hk-honest-a", "hk-honest-b", "hk-honest-c"):
            net.add(name, encode_delta(w.deltas[1][name]))
        make_validator(tmp_path / "wallets", net.ledger, net.netuid, net.coldkey)
        _advance_past_round_1(net.ledger)
        state = tmp_path / "state"
        cmd = validator_cmd(
            w, net.run_id, state, net.netuid, tmp_path / "wallets",
            "--eval.max-peers", "2", "--eval.min-listings", "0",
        )  # fmt: skip
        (proc,) = run_validators([cmd], w.ledger_path, cwd=REPO, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = json.loads((state / "rounds" / "1" / "record.json").read_text())
        smp = rec["sampling"]
        names = {u: n for n, u in net.uids.items()}
        listed = {names[u] for u in smp["listed"]}
        selected = {names[u] for u in smp["selected"]}
        scores = {names[s["uid"]]: s for s in rec["scores"]}
        assert len(selected) == 2 and all(n.startswith("hk-honest") for n in selected), (selected, listed)
        assert all(scores[n]["score"] > 0 for n in selected), scores
        assert len(listed) <= 5, listed  # the sample and its replacements, never all six
        for n in net.uids:
            if n not in listed:
                assert scores[n]["reason"].startswith("not sampled"), scores[n]
            elif n.startswith("empty"):
                assert "no contribution" in scores[n]["reason"], scores[n]
    finally:
        net.close()


@pytest.mark.slow
def test_a_validator_killed_mid_round_finishes_that_round_after_restart(validator_world, tmp_path):  # noqa: F811
    w = validator_world
    # no rate limit: the fixture ledger's head stands still at block 25 (block time 10,000 s) and counts
    # the validator's registration as its last update, so any limit would refuse the round's one set.
    # "Never twice" is shown by the weight queue: round 1 done once, and a later start sends nothing.
    net = Subnet(w, tmp_path, f"vrestart-{uuid.uuid4().hex[:8]}")
    try:
        net.add("stall", encode_delta(w.deltas[1]["hk-honest-b"]), fault="stall")  # holds the fetch step open
        net.add("hk-honest-a", encode_delta(w.deltas[1]["hk-honest-a"]))
        net.add("hk-honest-c", encode_delta(w.deltas[1]["hk-honest-c"]))
        make_validator(tmp_path / "wallets", net.ledger, net.netuid, net.coldkey)
        _advance_past_round_1(net.ledger)
        state = tmp_path / "state"
        log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
        cmd = validator_cmd(w, net.run_id, state, net.netuid, tmp_path / "wallets")
        first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (state / "in_progress.json").exists():  # the round has started: fetching
                assert first.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "first.log"
                ).read_text()[-2000:]
                time.sleep(0.1)
            time.sleep(2.0)
            os.kill(first.pid, signal.SIGKILL)  # mid-round: no record, no weights yet
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            log.close()
        assert json.loads((state / "in_progress.json").read_text()) == {"round": 1}
        assert not (state / "rounds" / "1" / "record.json").exists()
        (second,) = run_validators([cmd], w.ledger_path, cwd=REPO, env=_env())
        assert second.returncode == 0, second.stderr[-3000:]
        assert "resuming round 1" in second.stderr
        rec = json.loads((state / "rounds" / "1" / "record.json").read_text())
        assert not (state / "in_progress.json").exists()
        scores = {s["uid"]: s["score"] for s in rec["scores"]}
        assert scores[net.uids["hk-honest-a"]] > 0 and scores[net.uids["stall"]] == 0
        queue = json.loads((state / "weights_queue.json").read_text())
        assert "1" in queue["done"] and queue["entries"] == []
        assert all(o["action"] == "set" for o in rec["weights"]["outcomes"]), rec["weights"]
        val_uid = net.ledger.uid_of(net.netuid, _validator_hotkey(tmp_path))
        assert dict(net.ledger.weights(net.netuid)[val_uid])[net.uids["hk-honest-a"]] > 0
        # a third start finds the round done: it evaluates nothing more and sends nothing again
        third = subprocess.run(
            [*cmd[: cmd.index("--max-rounds")], "--max-seconds", "3", *cmd[cmd.index("--max-rounds") + 2 :]],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert third.returncode == 0, third.stderr[-3000:]
        assert "round 1:" not in third.stdout
        queue = json.loads((state / "weights_queue.json").read_text())
        assert queue["entries"] == [] and list(queue["done"]) == ["1"]
    finally:
        net.close()
