"""``peer status`` — who this peer is on the network: hotkey, peer id, addresses, registration, rounds,
and why it earns what it earns.

Reads only local files (wallet, the peer's home folder: identity key, publisher ready file, outbox) and
asks the chain read-only questions (uid, commitment). When registered, it also fetches every validator's
newest signed explanation (peer.net.explanations) and shows the line for this hotkey (``--no-reasons``
skips that). It never creates a key, a ledger or a wallet. A chain that cannot be reached is reported as
``unknown (why)``, not as an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.errors import UserError
from peer.net.identity import identity_path, load_identity
from peer.net.records import Commitment, RecordError

READY_FILE = "publisher.ready.json"


@dataclass(kw_only=True)
class PeerStatus:
    hotkey: str
    home: str
    peer_id: str | None = None
    """None until ``peer join`` created the identity key."""
    publisher: dict | None = None
    """``{"pid", "addrs", "running"}`` from the publisher's ready file, if it ever started."""
    registration: str = "unknown"
    """``uid N on subnet M`` / ``not registered on subnet M`` / ``unknown (why)``."""
    commitment: str | None = None
    """What the chain holds for this hotkey (text form), if anything."""
    commitment_matches: bool | None = None
    """Whether the on-chain commitment names this peer id (None if there is none / chain unknown)."""
    last_contribution_round: int | None = None
    last_state_round: int | None = None
    reasons: list[dict] = field(default_factory=list)
    """The newest signed explanation of every validator for this hotkey (peer.doctor.validator_reasons):
    ``{"validator", "uid", "round", "score", "reason", "line"}`` or ``{"validator", "uid", "error"}``."""
    problems: list[str] = field(default_factory=list)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rounds(outbox: Path, kind: str) -> list[int]:
    base = outbox / kind
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file())


def collect_status(
    *,
    hotkey: str,
    home: Path,
    chain_cfg=None,
    run_id: str | None = None,
    explain_timeout_s: float | None = 5.0,
) -> PeerStatus:
    """Gather the status; ``chain_cfg`` is a :class:`peer.chain.ChainConfig` (None: registration unknown).
    ``explain_timeout_s``: per-validator dial limit when fetching the newest reasons (None: skip them)."""
    home = Path(home)
    st = PeerStatus(hotkey=hotkey, home=str(home))
    key = identity_path(home)
    if key.exists():
        try:
            st.peer_id = load_identity(key).peer_id
        except UserError as e:
            st.problems.append(str(e))
    ready = home / READY_FILE
    if ready.exists():
        try:
            info = json.loads(ready.read_text())
            st.publisher = {
                "pid": info["pid"],
                "addrs": info["addrs"],
                "running": _pid_running(int(info["pid"])),
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            st.problems.append(f"{ready} is unreadable ({e}); it is rewritten when the publisher starts")
    outbox = home / "outbox"
    contrib, state = _rounds(outbox, "rounds"), _rounds(outbox, "state")
    st.last_contribution_round = contrib[-1] if contrib else None
    st.last_state_round = state[-1] if state else None
    if chain_cfg is not None:
        _chain_status(st, chain_cfg, run_id=run_id, explain_timeout_s=explain_timeout_s)
    return st


def _chain_status(st: PeerStatus, chain_cfg, *, run_id: str | None, explain_timeout_s: float | None) -> None:
    from peer.chain import ChainError, connect

    if chain_cfg.is_local and not Path(chain_cfg.ledger_path).exists():
        st.registration = f"unknown (no ledger at {chain_cfg.ledger_path})"
        return
    try:
        chain = connect(chain_cfg)
    except UserError as e:
        st.registration = f"unknown ({e})"
        return
    try:
        uid = chain.uid_of(chain_cfg.netuid, st.hotkey)
        st.registration = (
            f"uid {uid} on subnet {chain_cfg.netuid}"
            if uid is not None
            else f"not registered on subnet {chain_cfg.netuid}"
        )
        raw = chain.commitments(chain_cfg.netuid).get(st.hotkey)
        if uid is not None and explain_timeout_s is not None:
            _latest_reasons(st, chain, chain_cfg, run_id, explain_timeout_s)
    except ChainError as e:
        st.registration = f"unknown ({e})"
        return
    finally:
        chain.close()
    if raw:
        try:
            c = Commitment.from_bytes(raw)
            st.commitment = c.multiaddr
            st.commitment_matches = st.peer_id is not None and c.peer_id == st.peer_id
        except RecordError as e:
            st.commitment = f"unreadable ({e})"
            st.commitment_matches = False


def _latest_reasons(st: PeerStatus, chain, chain_cfg, run_id: str | None, timeout_s: float) -> None:
    """Every validator's newest signed explanation for this hotkey (fetched over py-libp2p)."""
    import tempfile

    from peer.doctor import explaining_validators, validator_reasons
    from peer.net.dial_policy import private_allowed_for
    from peer.net.fetch import FetchClient, FetchConfig
    from peer.net.publisher import quiet_libp2p

    netuid = chain_cfg.netuid
    if not explaining_validators(chain.metagraph(netuid), st.hotkey):
        return  # nobody to ask: no libp2p host needed
    quiet_libp2p()
    with tempfile.TemporaryDirectory(prefix="gradswarm-status-") as tmp:
        cfg = FetchConfig(
            cache_dir=Path(tmp),
            run_id=run_id,
            connect_timeout_s=timeout_s,
            io_timeout_s=timeout_s,
            allow_private=private_allowed_for(chain_cfg),
        )
        with FetchClient(cfg) as client:
            st.reasons = validator_reasons(chain, netuid, st.hotkey, client, rounds=1, run_id=run_id)


def format_status(st: PeerStatus) -> str:
    pub = st.publisher
    if pub is None:
        pub_line = "never started (`peer join` starts it)"
    else:
        state = "running" if pub["running"] else "not running"
        pub_line = f"{state} (pid {pub['pid']}) on {', '.join(pub['addrs'])}"
    commit_line = st.commitment or "none"
    if st.commitment_matches is False and st.commitment:
        commit_line += "  <- does not name this peer id: validators cannot reach you; re-run `peer join`"
    lines = [
        f"hotkey        {st.hotkey}",
        f"home          {st.home}",
        f"peer id       {st.peer_id or 'none yet (created by `peer join`)'}",
        f"publisher     {pub_line}",
        f"registration  {st.registration}",
        f"commitment    {commit_line}",
        f"published     contribution round {_r(st.last_contribution_round)}, state round {_r(st.last_state_round)}",
    ]
    for r in st.reasons:
        lines.append(f"validator {r['uid']:<3} {r.get('line') or r.get('error')}")
    lines += [f"problem       {p}" for p in st.problems]
    return "\n".join(lines)


def _r(r: int | None) -> str:
    return "none" if r is None else str(r)


def register(subparsers) -> None:
    from peer.chain.wallet import add_wallet_args

    p = subparsers.add_parser(
        "status",
        help="show this peer's identity: hotkey, peer id, addresses, registration, last published round",
        description=__doc__,
    )
    add_wallet_args(p)
    p.add_argument("--run-id", default="gradswarm", help="swarm name (locates the default --home)")
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="peer folder (default: ~/.gradswarm/<run-id>/<wallet>-<hotkey>)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from peer.chain import add_chain_args

    add_chain_args(p)
    p.add_argument("--no-chain", action="store_true", help="skip the chain (registration shows 'unknown')")
    p.add_argument(
        "--no-reasons", action="store_true", help="do not fetch validators' explanations of your latest score"
    )
    p.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    from peer.chain.wallet import default_peer_home, load_hotkey, wallet_config_from_args

    wallet = wallet_config_from_args(args)
    if wallet.create:
        raise UserError("`peer status` never creates keys: drop --wallet.create")
    hotkey = load_hotkey(wallet).ss58_address
    home = args.home or default_peer_home(args.run_id, wallet)
    from peer.chain import chain_config_from_args

    chain_cfg = None if args.no_chain else chain_config_from_args(args)
    st = collect_status(
        hotkey=hotkey,
        home=home,
        chain_cfg=chain_cfg,
        run_id=args.run_id,
        explain_timeout_s=None if args.no_reasons else 5.0,
    )
    print(json.dumps(asdict(st)) if args.json else format_status(st))
    return 0
