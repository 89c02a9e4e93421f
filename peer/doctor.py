"""``peer doctor`` — is this peer set up to earn, and if it earns nothing, why?

    peer doctor --wallet.name alice --wallet.hotkey default --netuid 1 [--json]

One table of checks; each says ``ok`` / ``warn`` / ``fail`` / ``skip``, what it found, and how to fix it.
The exit code is 1 if any check fails. It never needs the coldkey password and never writes to the
chain. What it checks, in order:

* **wallet**: the hotkey file is readable (the coldkey is not touched);
* **registration**: the hotkey has a uid on the subnet;
* **commitment**: the on-chain commitment names this peer id and an address the running publisher
  listens on;
* **publisher reachable** / **DHT reachable**: the committed publisher, and the DHT addresses in its
  signed identity record, are dialled from a fresh libp2p host *on this machine* (address, port, peer id
  and record right, processes answering), then **dialled back from another node**: validators (most
  stake first), then other peers, are asked over the artifact protocol's ``dialback`` op to dial those
  addresses from their machine (:func:`dial_back`) — the only proof that the route from outside (NAT,
  firewall, port forwarding) works. A node only dials the IP it sees the request come from, so an
  address other than this machine's public IP is reported as such;
* **model fits device**: estimated training memory of the config vs free GPU (or CPU) memory;
* **software**: torch, CUDA, bitsandbytes as the device and optimizer need;
* **disk**: free space for data and checkpoints where they live;
* **clock**: this machine's clock vs the chain's (a subtensor's ``Timestamp.Now``);
* **validators**: the newest signed explanations of every reachable validator for this hotkey
  ("round 120: 0 — not shown to have trained on its assigned pages (… t = 1.20 < 2.0)").

It speaks py-libp2p, so it never imports hivemind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.errors import UserError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(kw_only=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass(kw_only=True)
class DoctorInputs:
    """What ``peer doctor`` looks at (one field per flag)."""

    wallet: object
    """peer.chain.wallet.WalletConfig"""
    home: Path
    chain_cfg: object | None
    """peer.chain.ChainConfig, or None (``--no-chain``: the chain checks are skipped)."""
    run_id: str
    config: str = "debug"
    device: str | None = None
    optimizer: str | None = None
    precision: str = "auto"
    """As ``peer join --precision``: ``auto`` is bf16 autocast on a GPU, fp32 on a CPU."""
    data_dir: Path | None = None
    timeout_s: float = 10.0
    """Per dial (publisher, DHT, each validator)."""
    explain_rounds: int = 3
    """Newest explained rounds shown per validator."""


@dataclass(kw_only=True)
class _Found:
    """Facts one check finds and later checks use."""

    hotkey: str | None = None
    peer_id: str | None = None
    chain: object | None = None
    commitment: object | None = None
    identity: object | None = None
    reasons: list[dict] = field(default_factory=list)
    helpers: list | None = None
    """Targets (other nodes' publishers) that may be asked to dial back, validators first."""


# ------------------------------------------------------------------------------------------- pure parts


def llama_parameters(model) -> int:
    """Parameters of the Llama architecture a ModelConfig describes (no model is built)."""
    h, i, n = model.hidden_size, model.intermediate_size, model.num_hidden_layers
    heads = model.num_attention_heads
    kv = model.num_key_value_heads or heads
    head_dim = h // heads
    attn = 2 * h * h + 2 * h * kv * head_dim
    per_layer = attn + 3 * h * i + 2 * h
    return n * per_layer + h  # + the final norm; embeddings are added by the caller (they need vocab)


def training_memory_bytes(run, optimizer: str, bf16: bool = False) -> int:
    """Peak training memory of a peer, estimated: fp32 weights, gradients, AdamW state (2 fp32 moments,
    or ~2 bytes for bitsandbytes 8-bit), θ_start and outer momentum for DiLoCo, Δ for averaging, plus
    activations of one batch (no recompute; 2 bytes a value under ``bf16`` autocast, else 4) and logits.
    In fp32 the attention scores (batch × heads × seq² per layer) are counted too: fp32 attention cannot
    use the flash kernels (measured on an H200: llama-1b in fp32 asks for 4 GiB score blocks and does not
    fit 140 GiB at its batch size; in bf16 it peaks at 56.6 GiB). Errs high by design (x1.2)."""
    m, d, t = run.model, run.data, run.train
    params = llama_parameters(m) + d.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    state = 8 if optimizer == "adamw" else 2
    per_param = 4 + 4 + state + 4 + 4 + 4
    tokens = t.batch_size * d.seq_len
    width = 2 if bf16 else 4
    acts = tokens * m.num_hidden_layers * (16 * m.hidden_size + 3 * m.intermediate_size) * width
    if not bf16:
        acts += tokens * d.seq_len * m.num_attention_heads * m.num_hidden_layers * 4
    logits = tokens * d.vocab_size * 4 * 3
    return int(1.2 * (params * per_param + acts + logits))


def checkpoint_bytes(run) -> int:
    """Disk a peer needs: a few fp32 states and Δs in its outbox and checkpoints (6 rounds kept)."""
    m, d = run.model, run.data
    params = llama_parameters(m) + d.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return params * 4 * 8


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def worst(checks: list[Check]) -> str:
    order = [OK, SKIP, WARN, FAIL]
    return max((c.status for c in checks), key=order.index, default=OK)


# ------------------------------------------------------------------------------------------- checks


def check_wallet(inp: DoctorInputs, f: _Found) -> Check:
    from peer.chain.wallet import load_hotkey

    try:
        kp = load_hotkey(inp.wallet)
    except UserError as e:
        return Check(
            name="wallet",
            status=FAIL,
            detail=str(e),
            fix="create it: `peer join … --wallet.create` (or btcli wallet new_hotkey)",
        )
    f.hotkey = kp.ss58_address
    return Check(name="wallet", status=OK, detail=f"hotkey {kp.ss58_address} readable (no coldkey needed)")


def check_registration(inp: DoctorInputs, f: _Found) -> Check:
    if inp.chain_cfg is None:
        return Check(name="registration", status=SKIP, detail="--no-chain")
    if f.hotkey is None:
        return Check(name="registration", status=SKIP, detail="no hotkey")
    from peer.chain import ChainError, connect

    cfg = inp.chain_cfg
    if cfg.is_local and not Path(cfg.ledger_path).exists():
        return Check(
            name="registration",
            status=FAIL,
            detail=f"no ledger at {cfg.ledger_path}",
            fix="point --ledger.path at the swarm's ledger (or start one: `peer chain create-subnet`)",
        )
    try:
        f.chain = connect(cfg)
        uid = f.chain.uid_of(cfg.netuid, f.hotkey)
    except (UserError, ChainError) as e:
        return Check(
            name="registration",
            status=FAIL,
            detail=f"chain unreachable: {e}",
            fix="check --subtensor.network / --subtensor.chain_endpoint",
        )
    if uid is None:
        return Check(
            name="registration",
            status=FAIL,
            detail=f"hotkey not registered on subnet {cfg.netuid}",
            fix="`peer join` registers on a local ledger; on a real chain add --register.burn (or btcli subnets register)",
        )
    return Check(name="registration", status=OK, detail=f"uid {uid} on subnet {cfg.netuid}")


def check_commitment(inp: DoctorInputs, f: _Found) -> Check:
    from peer.net.identity import identity_path, load_identity
    from peer.net.records import Commitment, RecordError
    from peer.status import READY_FILE, _pid_running

    if f.chain is None:
        return Check(name="commitment", status=SKIP, detail="no chain")
    key = identity_path(inp.home)
    if key.exists():
        try:
            f.peer_id = load_identity(key).peer_id
        except UserError as e:
            return Check(
                name="commitment",
                status=FAIL,
                detail=str(e),
                fix="delete the key; `peer join` makes a new one",
            )
    raw = f.chain.commitments(inp.chain_cfg.netuid).get(f.hotkey)
    if not raw:
        return Check(
            name="commitment",
            status=FAIL,
            detail="nothing committed on chain: validators cannot find your publisher",
            fix="run `peer join` (without --no-publish); it commits the publisher's address",
        )
    try:
        c = Commitment.from_bytes(raw)
    except RecordError as e:
        return Check(
            name="commitment", status=FAIL, detail=f"unreadable: {e}", fix="re-run `peer join` to recommit"
        )
    from peer.net.dial_policy import dial_refusal, private_allowed_for

    why = dial_refusal(c.addr, allow_private=private_allowed_for(inp.chain_cfg))
    if why is not None:
        return Check(
            name="commitment",
            status=FAIL,
            detail=f"{c.addr} {why}: validators of this chain never dial it and score you 0",
            fix="pass --publisher.announce /ip4/<public ip>/tcp/<port> (and forward that port); "
            "`peer join` recommits on start",
        )
    f.commitment = c
    if f.peer_id is not None and c.peer_id != f.peer_id:
        return Check(
            name="commitment",
            status=FAIL,
            detail=f"commits peer id {c.peer_id[:16]}…, this peer is {f.peer_id[:16]}… (home {inp.home})",
            fix="re-run `peer join` with this --home (it recommits), or pass the --home that made the commitment",
        )
    ready = inp.home / READY_FILE
    try:
        info = json.loads(ready.read_text())
        addrs, running = list(info["addrs"]), _pid_running(int(info["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Check(
            name="commitment",
            status=WARN,
            detail=f"commits {c.multiaddr}; no publisher has run in {inp.home}",
            fix="start `peer join` (its publisher serves your contributions)",
        )
    if not running:
        return Check(
            name="commitment",
            status=FAIL,
            detail=f"commits {c.multiaddr} but the publisher (pid {info['pid']}) is not running",
            fix="start `peer join`; validators score a silent peer 0",
        )
    port = c.addr.rsplit("/", 1)[-1]
    listening = any(a == c.addr or a.rsplit("/", 1)[-1] == port for a in addrs)
    if not listening:
        return Check(
            name="commitment",
            status=FAIL,
            detail=f"commits {c.addr} but the publisher listens on {', '.join(addrs)}",
            fix="pass --publisher.announce /ip4/<public ip>/tcp/<the port it listens on> (and forward that port), "
            "or fix --publisher.listen; `peer join` recommits on start",
        )
    return Check(name="commitment", status=OK, detail=f"{c.multiaddr} = the running publisher")


def dialback_helpers(
    chain, netuid: int, own_hotkey: str, limit: int = 8, *, allow_private: bool = False
) -> list:
    """Other nodes' publishers to ask for a dial-back: validators by stake, then peers by stake; none whose
    commitment :func:`peer.net.dial_policy.dial_refusal` refuses."""
    from peer.net.fetch import Target

    mg = chain.metagraph(netuid)
    commitments = chain.commitments(netuid)
    vals = explaining_validators(mg, own_hotkey)
    rest = sorted((n for n in mg.neurons if n.hotkey != own_hotkey and n not in vals), key=lambda n: -n.stake)
    out = []
    for nr in vals + rest:
        raw = commitments.get(nr.hotkey)
        if not raw:
            continue
        target, _ = Target.from_chain(raw, nr.hotkey, allow_private=allow_private)
        if target is not None:
            out.append(target)
        if len(out) >= limit:
            break
    return out


def dial_back(inp: DoctorInputs, f: _Found, client, addrs: list[str], tries: int = 3):
    """Ask up to ``tries`` other nodes, in turn, to dial ``addrs`` from their machine; the first answer
    (a DialbackResponse) and what the others said, or (None, what each said) when none answered."""
    from peer.chain.base import ChainError
    from peer.net.fetch import FetchError

    if f.helpers is None:
        try:
            allow = client.cfg.allow_private  # the policy the client's host enforces (_client)
            f.helpers = (
                dialback_helpers(f.chain, inp.chain_cfg.netuid, f.hotkey, allow_private=allow)
                if f.chain
                else []
            )
        except ChainError as e:
            f.helpers = []
            return None, [f"could not list other nodes: {str(e)[:200]}"]
    said = []
    for t in f.helpers[:tries]:
        try:
            return client.dialback(t, addrs), said
        except FetchError as e:
            said.append(f"{t.peer_id[-8:]}: {str(e)[:200]}")
    return None, said


def _dialback_check(name: str, local_detail: str, answer, said: list[str], fix: str) -> Check:
    """The check from a local dial that worked and another node's dial-back (or its absence)."""
    if answer is None:
        why = "; ".join(said) if said else "no other node with a publisher on the subnet"
        return Check(
            name=name,
            status=WARN,
            detail=f"{local_detail} (dialled from this machine); no other node dialled back ({why})",
            fix="ask again when validators or peers of the subnet are online (their publishers answer "
            "dial-backs); until then the route from outside is unproven",
        )
    if answer.reachable:
        return Check(
            name=name,
            status=OK,
            detail=f"{local_detail}; dialled back by {answer.peer_id[-8:]} from its machine "
            f"({answer.seconds:.1f}s; it sees you at {answer.observed_ip})",
        )
    return Check(
        name=name,
        status=FAIL,
        detail=f"{local_detail} from this machine, but {answer.peer_id[-8:]} could not dial it: {answer.detail} "
        f"(it sees you at {answer.observed_ip})",
        fix=fix,
    )


def check_publisher_reachable(inp: DoctorInputs, f: _Found, client) -> Check:
    from peer.net.fetch import FetchError, Target

    if f.commitment is None or client is None:
        return Check(name="publisher reachable", status=SKIP, detail="no commitment to dial")
    t = Target(addr=f.commitment.addr, peer_id=f.commitment.peer_id, hotkey=f.hotkey)
    try:
        listing = client._call(client._counted, client.alist_round(t, None))
    except FetchError as e:
        return Check(
            name="publisher reachable",
            status=FAIL,
            detail=f"dialling {f.commitment.multiaddr}: {e}",
            fix="the committed address must be one others can dial: check the IP/port, port forwarding, "
            "firewall; --publisher.announce sets what is committed",
        )
    f.identity = listing.identity
    last = listing.rounds[-1] if listing.rounds else "none yet"
    local = f"answered at {f.commitment.addr} with a valid signed identity; newest contribution round {last}"
    answer, said = dial_back(inp, f, client, [f.commitment.multiaddr])
    return _dialback_check(
        "publisher reachable",
        local,
        answer,
        said,
        fix="forward the publisher's port to this machine and open it in the firewall; the committed "
        "address must be your public IP (--publisher.announce)",
    )


def check_dht_reachable(inp: DoctorInputs, f: _Found, client) -> Check:
    from peer.net.discovery import probe_dht

    if f.identity is None:
        return Check(name="DHT reachable", status=SKIP, detail="no identity record read")
    addrs = list(f.identity.dht_addrs)
    if not addrs:
        return Check(
            name="DHT reachable",
            status=WARN,
            detail="your identity record names no DHT address: newcomers cannot join through you by netuid",
            fix="upgrade and restart `peer join` (it publishes its DHT addresses)",
        )
    why = client._call(
        lambda: probe_dht(addrs, timeout_s=inp.timeout_s, allow_private=client.cfg.allow_private)
    )
    if why is not None:
        return Check(
            name="DHT reachable",
            status=FAIL,
            detail=f"{', '.join(addrs)}: {why}",
            fix="set --host-maddrs to a fixed port and --announce-maddrs to your public address; forward the port",
        )
    answer, said = dial_back(inp, f, client, addrs[:4])
    return _dialback_check(
        "DHT reachable",
        f"{addrs[0]} answered",
        answer,
        said,
        fix="forward the DHT port (--host-maddrs) and announce your public address (--announce-maddrs)",
    )


def _device_and_optimizer(inp: DoctorInputs) -> tuple[str, str, object | None]:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    device = inp.device or ("cuda" if cuda else "cpu")
    optimizer = inp.optimizer or ("adamw8bit" if device.startswith("cuda") else "adamw")
    return device, optimizer, torch


def _available_cpu_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_software(inp: DoctorInputs, f: _Found) -> Check:
    device, optimizer, torch = _device_and_optimizer(inp)
    if torch is None:
        return Check(
            name="software",
            status=FAIL,
            detail="torch is not installed",
            fix="`make setup` (or pip install torch)",
        )
    parts = [f"torch {torch.__version__}"]
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return Check(
                name="software",
                status=FAIL,
                detail=f"--device {device} but torch sees no CUDA ({torch.__version__})",
                fix="install a CUDA build of torch matching your driver, or use --device cpu",
            )
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes

            parts.append(f"bitsandbytes {bitsandbytes.__version__}")
        except ImportError:
            return Check(
                name="software",
                status=FAIL,
                detail="optimizer adamw8bit needs bitsandbytes, which is not installed",
                fix="pip install bitsandbytes, or --optimizer adamw",
            )
    parts.append(f"device {device}, optimizer {optimizer}")
    return Check(name="software", status=OK, detail=", ".join(parts))


def check_memory(inp: DoctorInputs, f: _Found) -> Check:
    from peer.config import load_run_config

    try:
        run = load_run_config(inp.config)
    except UserError as e:
        return Check(
            name="model fits device",
            status=FAIL,
            detail=str(e),
            fix="--config: a name from model_configs/ or a YAML path",
        )
    device, optimizer, torch = _device_and_optimizer(inp)
    if torch is not None:  # as peer join resolves --precision
        from peer.data.model import uses_bf16

        bf16 = uses_bf16(inp.precision, device)
    else:
        bf16 = inp.precision == "bf16"
    need = training_memory_bytes(run, optimizer, bf16=bf16)
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        idx = int(device.split(":")[1]) if ":" in device else 0
        free, _total = torch.cuda.mem_get_info(idx)
        where = f"free on {device}"
    else:
        free = _available_cpu_memory()
        where = "available RAM"
    if free is None:
        return Check(
            name="model fits device", status=WARN, detail=f"needs ~{_gib(need)}; free memory unknown"
        )
    detail = (
        f"{run.name}: needs ~{_gib(need)} ({optimizer}, {'bf16' if bf16 else 'fp32'}), {_gib(free)} {where}"
    )
    if need > free:
        return Check(
            name="model fits device",
            status=FAIL,
            detail=detail,
            fix="a smaller --config, a smaller --batch-size, or on CUDA --optimizer adamw8bit and --precision auto",
        )
    if need > 0.8 * free:
        return Check(
            name="model fits device", status=WARN, detail=detail + " (tight)", fix="lower --batch-size"
        )
    return Check(name="model fits device", status=OK, detail=detail)


def check_disk(inp: DoctorInputs, f: _Found) -> Check:
    from peer.config import load_run_config

    try:
        run = load_run_config(inp.config)
    except UserError:
        return Check(name="disk", status=SKIP, detail="unknown config")
    need = checkpoint_bytes(run)
    data_dir = inp.data_dir or Path.home() / ".cache" / "gradswarm" / "data" / run.name
    lines, worst_free = [], None
    for label, path in (("home", inp.home), ("data", data_dir)):
        p = Path(path)
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p).free
        worst_free = free if worst_free is None else min(worst_free, free)
        lines.append(f"{label} {_gib(free)} free")
    detail = f"{', '.join(lines)}; checkpoints + outbox need ~{_gib(need)}"
    if worst_free < need:
        return Check(name="disk", status=FAIL, detail=detail, fix="free space or move --home / --data-dir")
    if worst_free < 2 * need + (1 << 30):
        return Check(
            name="disk", status=WARN, detail=detail, fix="little headroom for prepared data and logs"
        )
    return Check(name="disk", status=OK, detail=detail)


def check_clock(inp: DoctorInputs, f: _Found) -> Check:
    if f.chain is None:
        return Check(name="clock", status=SKIP, detail="no chain")
    if inp.chain_cfg.is_local:
        return Check(name="clock", status=OK, detail="the local ledger's blocks follow this machine's clock")
    try:
        now_ms = f.chain._q("Timestamp", "Now")
        now_ms = int(getattr(now_ms, "value", now_ms))
    except Exception as e:  # noqa: BLE001 - any RPC trouble makes this check a warning, never a crash
        return Check(
            name="clock", status=WARN, detail=f"cannot read the chain's time ({type(e).__name__}: {e})"
        )
    skew = time.time() - now_ms / 1000
    detail = f"this machine is {skew:+.1f}s from the chain's last block time"
    # the last block is up to one block time old
    if abs(skew - f.chain.block_time / 2) > 30:
        return Check(name="clock", status=WARN, detail=detail, fix="enable NTP (timedatectl set-ntp true)")
    return Check(name="clock", status=OK, detail=detail)


def explaining_validators(mg, own_hotkey: str, limit: int = 16) -> list:
    """The validators whose explanations are worth asking for: permit and stake, most stake first."""
    vals = [nr for nr in mg.neurons if nr.validator_permit and nr.stake > 0 and nr.hotkey != own_hotkey]
    return sorted(vals, key=lambda n: -n.stake)[:limit]


def validator_reasons(chain, netuid: int, hotkey: str, client, *, rounds: int = 3, run_id=None) -> list[dict]:
    """The newest ``rounds`` explanations of every validator (permit and stake) that serves them, for
    ``hotkey``: ``{"validator", "uid", "round", "score", "weight_share", "reason", "line"}`` or
    ``{"validator", "uid", "error"}``. Signatures are checked against the validator's hotkey; a
    commitment the client's dial policy refuses (``client.cfg.allow_private``) is not dialled."""
    from peer.net.dial_policy import dial_refusal
    from peer.net.explanations import describe
    from peer.net.fetch import FetchError, Target
    from peer.net.records import Commitment, RecordError

    commitments = chain.commitments(netuid)
    out: list[dict] = []
    for nr in explaining_validators(chain.metagraph(netuid), hotkey):
        raw = commitments.get(nr.hotkey)
        base = {"validator": nr.hotkey, "uid": nr.uid}
        if not raw:
            out.append({**base, "error": "serves no explanations (no commitment)"})
            continue
        try:
            commitment = Commitment.from_bytes(raw)
            why = dial_refusal(commitment.addr, allow_private=client.cfg.allow_private)
            if why is not None:
                out.append({**base, "error": f"commitment {why}"})
                continue
            t = Target.from_commitment(commitment, nr.hotkey)
            have, newest = client.explanation(t, None)
            wanted = (
                [r for r in have if newest is None or r < newest.round][-(rounds - 1) :] if rounds > 1 else []
            )
            records = [newest] + [client.explanation(t, r)[1] for r in reversed(wanted)]
        except (FetchError, RecordError) as e:
            out.append({**base, "error": str(e)[:300]})
            continue
        if newest is None:
            out.append({**base, "error": "has not explained any round yet"})
            continue
        for rec in records:
            if rec is None:
                continue
            entry = rec.for_hotkey(hotkey)
            if entry is None:
                out.append({**base, "round": rec.round, "error": "did not list you (not in its metagraph)"})
                continue
            out.append(
                {
                    **base,
                    "round": rec.round,
                    "score": entry.score,
                    "weight_share": entry.weight_share,
                    "reason": entry.reason,
                    "line": describe(entry, rec.round),
                }
            )
    return out


def check_validators(inp: DoctorInputs, f: _Found, client) -> Check:
    if f.chain is None or client is None or f.hotkey is None:
        return Check(name="validators", status=SKIP, detail="no chain")
    f.reasons = validator_reasons(
        f.chain, inp.chain_cfg.netuid, f.hotkey, client, rounds=inp.explain_rounds, run_id=inp.run_id
    )
    if not f.reasons:
        return Check(name="validators", status=WARN, detail="no validator (permit + stake) on this subnet")
    lines = [f"uid {r['uid']}: {r.get('line') or r['error']}" for r in f.reasons]
    scored = [r for r in f.reasons if "score" in r]
    if not scored:
        return Check(
            name="validators",
            status=WARN,
            detail="; ".join(lines),
            fix="no validator has explained a round for you yet: wait a round, then check the reasons",
        )
    newest = max(scored, key=lambda r: r["round"])
    status = OK if newest["score"] > 0 else WARN
    fix = "" if status == OK else "the reason says what to change (see README: why is my score zero)"
    return Check(name="validators", status=status, detail="\n".join(lines), fix=fix)


def run_checks(inp: DoctorInputs) -> tuple[list[Check], _Found]:
    """Every check, in order (a recipe); each one's failure never stops the others."""
    f = _Found()
    checks = [check_wallet(inp, f), check_registration(inp, f), check_commitment(inp, f)]
    client = None
    try:
        if f.chain is not None:
            client = _client(inp)
        checks += [check_publisher_reachable(inp, f, client), check_dht_reachable(inp, f, client)]
        checks += [check_memory(inp, f), check_software(inp, f), check_disk(inp, f), check_clock(inp, f)]
        checks.append(check_validators(inp, f, client))
    finally:
        if client is not None:
            client.close()
            shutil.rmtree(client.cfg.cache_dir, ignore_errors=True)  # the temp folder _client made
        if f.chain is not None:
            f.chain.close()
    return checks, f


def _client(inp: DoctorInputs):
    import tempfile

    from peer.net.dial_policy import private_allowed_for
    from peer.net.fetch import FetchClient, FetchConfig
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    cache = Path(tempfile.mkdtemp(prefix="gradswarm-doctor-"))
    client = FetchClient(
        FetchConfig(
            cache_dir=cache,
            run_id=inp.run_id,
            connect_timeout_s=inp.timeout_s,
            io_timeout_s=inp.timeout_s,
            allow_private=inp.chain_cfg is None or private_allowed_for(inp.chain_cfg),
        )
    )
    client.start()
    return client


# ------------------------------------------------------------------------------------------- CLI


def format_table(checks: list[Check]) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "red", SKIP: "dim"}
    table = Table(title="peer doctor", show_lines=True)
    for col in ("check", "", "found", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    buf = StringIO()
    Console(file=buf, width=int(os.environ.get("COLUMNS", "140")), force_terminal=False).print(table)
    return buf.getvalue()


def register(subparsers) -> None:
    from peer.chain import add_chain_args
    from peer.chain.wallet import add_wallet_args

    p = subparsers.add_parser(
        "doctor",
        help="check everything a peer needs to earn, and show validators' reasons for its score",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    add_wallet_args(p)
    p.add_argument("--run-id", default="gradswarm", help="swarm name (locates the default --home)")
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="peer folder (default: ~/.gradswarm/<run-id>/<wallet>-<hotkey>)",
    )
    p.add_argument("--config", default="debug", help="model config you run (for the memory and disk checks)")
    p.add_argument("--device", default=None, help="device you train on (default: cuda if available)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="as peer join's")
    p.add_argument("--data-dir", type=Path, default=None, help="prepared data folder")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per dial")
    p.add_argument("--rounds", type=int, default=3, help="explained rounds shown per validator")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_chain_args(p)
    p.add_argument("--no-chain", action="store_true", help="only the local checks")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    from peer.chain import chain_config_from_args
    from peer.chain.wallet import default_peer_home, wallet_config_from_args

    wallet = wallet_config_from_args(args)
    if wallet.create:
        raise UserError("`peer doctor` never creates keys: drop --wallet.create")
    home = args.home or default_peer_home(args.run_id, wallet)
    inp = DoctorInputs(
        wallet=wallet,
        home=Path(home),
        chain_cfg=None if args.no_chain else chain_config_from_args(args),
        run_id=args.run_id,
        config=args.config,
        device=args.device,
        optimizer=args.optimizer,
        precision=args.precision,
        data_dir=args.data_dir,
        timeout_s=args.timeout,
        explain_rounds=max(1, args.rounds),
    )
    checks, found = run_checks(inp)
    if args.json:
        print(
            json.dumps(
                {"checks": [asdict(c) for c in checks], "reasons": found.reasons, "status": worst(checks)}
            )
        )
    else:
        print(format_table(checks), end="")
    return 1 if worst(checks) == FAIL else 0
