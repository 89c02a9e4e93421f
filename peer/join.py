"""``peer join``: one command to join a swarm, train, average and publish.

    peer join --config debug --wallet.name alice --wallet.hotkey default \\
              --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/Qm… --run-id my-swarm

On a chain, ``--initial-peers`` may be left out: the peer finds live DHT addresses from the registered
peers' commitments and signed identity records (peer.net.discovery); when none is live it starts the swarm.
Without a chain (``--no-chain``), the first peer runs without ``--initial-peers`` and prints the
multiaddrs others join with.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from peer.chain.config import add_chain_args, chain_config_from_args, connect
from peer.chain.membership import RegisteredHotkeys, commit_address, ensure_commitment, ensure_registered
from peer.chain.wallet import (
    add_wallet_args,
    default_peer_home,
    load_coldkey,
    load_hotkey,
    wallet_config_from_args,
)
from peer.config import available_configs, load_run_config, override
from peer.errors import ConfigError
from peer.net.publisher import add_publisher_args
from peer.tracking import add_tracking_args, make_tracker, tracking_config_from_args
from peer.training.behaviour import Behaviour
from peer.training.swarm import check_initial_peers, parse_maddrs

log = logging.getLogger("gradswarm.join")


def register(sub) -> None:
    p = sub.add_parser(
        "join",
        help="join a swarm: sync the model, train on your assigned pages, average, publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--config",
        default="debug",
        help=f"model config name ({', '.join(available_configs())}) or a YAML path",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared data folder (default: ~/.cache/gradswarm/data/<config>)",
    )
    g.add_argument(
        "--corpus-dir",
        type=Path,
        default=None,
        help="offline corpus folder (default: $GRADSWARM_CORPUS or .cache/corpus)",
    )
    g.add_argument(
        "--data",
        default=None,
        help="sharded data set: URL or path of its manifest.json (`peer data build`); fetched lazily into "
        "<data-dir>/shard-cache (default: the built-in corpus)",
    )
    g = p.add_argument_group("swarm")
    g.add_argument(
        "--run-id", default="gradswarm", help="swarm name; every peer and validator of a swarm uses the same"
    )
    g.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="multiaddrs of peers already in the swarm (…/p2p/<peer id>); none = find them from the chain "
        "(registered peers' signed identity records), or start a new swarm if none is live",
    )
    g.add_argument(
        "--host-maddrs",
        nargs="*",
        default=["/ip4/0.0.0.0/tcp/0"],
        metavar="MADDR",
        help="addresses the DHT listens on (default: all interfaces, a free TCP port)",
    )
    g.add_argument(
        "--announce-maddrs",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="public addresses to announce (behind NAT / port forwarding)",
    )
    g.add_argument(
        "--home",
        type=Path,
        default=None,
        help="this peer's folder (default: ~/.gradswarm/<run-id>/<wallet>-<hotkey>)",
    )
    g.add_argument(
        "--round-genesis", type=float, default=0.0, help="unix time of round 0 of the wall clock (no chain)"
    )
    g = p.add_argument_group("training")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="ranks of this peer (one process each, one GPU each): parameters, gradients and optimizer state "
        "sharded over them with FSDP2; still one peer, one hotkey (default: every visible GPU with --device "
        "cuda, else 1)",
    )
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="inner steps' arithmetic: bf16 autocast (fp32 weights and optimizer state) or fp32 "
        "(default auto: bf16 on a GPU, fp32 on a CPU)",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default=None,
        help="inner optimizer (default: adamw on CPU, bitsandbytes adamw8bit on CUDA)",
    )
    g.add_argument(
        "--averaging",
        choices=["diloco", "sync"],
        default="diloco",
        help="diloco: average pseudo-gradients once per round; sync: hivemind Optimizer, per-step gradients",
    )
    g.add_argument(
        "--sync.target-batch",
        dest="sync_target_batch",
        type=int,
        default=None,
        help="sync mode: samples the swarm accumulates per optimizer step (default 64 x batch size)",
    )
    g.add_argument(
        "--compression",
        choices=["8bit", "fp16", "none", "topk"],
        default="8bit",
        help="all-reduce wire compression (topk: sparse Δs with error feedback, README 'Sparse Δs')",
    )
    g.add_argument("--round-seconds", type=float, default=None, help="override train.round_seconds")
    g.add_argument("--max-inner-steps", type=int, default=None, help="override train.max_inner_steps (H)")
    g.add_argument(
        "--averaging-reserve",
        type=float,
        default=None,
        help="override train.averaging_reserve_seconds (time left for averaging each round)",
    )
    g.add_argument(
        "--rounds",
        choices=["overlapped", "blocking"],
        default=None,
        help="override train.rounds: blocking (default; training waits for the all-reduce) or overlapped "
        "(the all-reduce runs while the next round trains, outer step one round late; faster on slow "
        "links, README 'How a round works')",
    )
    g.add_argument(
        "--probe-loss",
        action="store_true",
        help="evaluate one batch before and after each round's inner steps (two forward passes a round)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    g.add_argument("--max-rounds", type=int, default=None, help="stop after N rounds")
    g.add_argument("--max-seconds", type=float, default=None, help="stop after N seconds")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--eval-pages", type=int, default=4, help="held-out pages evaluated per round (0 = none)")
    g.add_argument(
        "--behaviour",
        choices=[b.value for b in Behaviour],
        default="honest",
        help="fault injection for studying incentives (local ledger only; refused on a real network)",
    )
    add_publisher_args(
        p,
        serves="this peer's contributions to validators",
        dialled_by="validators",
        no_publish_help="do not start the publisher (no rewards)",
    )
    g = p.add_argument_group("chain registration")
    g.add_argument(
        "--no-chain",
        action="store_true",
        help="no chain at all: wall-clock rounds, no registration, no rewards (a pure training swarm)",
    )
    g.add_argument(
        "--register.burn",
        dest="register_burn",
        action="store_true",
        help="allow burned registration (spends TAO from the coldkey on a real chain)",
    )
    g.add_argument(
        "--round-blocks",
        type=int,
        default=None,
        help="blocks per round on a chain (default: train.round_seconds / block time)",
    )
    add_chain_args(p)
    add_wallet_args(p)
    add_tracking_args(p)
    p.set_defaults(func=run)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    for noisy in ("hivemind", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "kernels" package hints on CPU
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> int:
    _setup_logging()
    import torch

    run_cfg = load_run_config(args.config)
    train = override(
        run_cfg.train,
        averaging_reserve_seconds=args.averaging_reserve,
        round_seconds=args.round_seconds,
        max_inner_steps=args.max_inner_steps,
        batch_size=args.batch_size,
        rounds=args.rounds,
    )
    run_cfg = override(run_cfg, train=train)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    optimizer = args.optimizer or ("adamw8bit" if device.startswith("cuda") else "adamw")
    nproc = _check_nproc(args, device, run_cfg)
    behaviour = Behaviour(args.behaviour)
    check_initial_peers(args.initial_peers)  # bad addresses fail before anything starts
    parse_maddrs(args.host_maddrs, "--host-maddrs")
    parse_maddrs(args.announce_maddrs, "--announce-maddrs")
    chain_cfg = None if args.no_chain else chain_config_from_args(args)
    if behaviour is not Behaviour.HONEST and chain_cfg is not None and not chain_cfg.is_local:
        raise ConfigError(
            f"--behaviour {behaviour.value} is a tool for local studies; it is refused on a real network"
        )
    wallet = wallet_config_from_args(args)
    keypair = load_hotkey(wallet)
    home = args.home or default_peer_home(args.run_id, wallet)
    data_dir = args.data_dir or Path.home() / ".cache" / "gradswarm" / "data" / run_cfg.name
    tracking = tracking_config_from_args(args)
    home.mkdir(parents=True, exist_ok=True)

    from peer.net.identity import identity_path, load_or_create_identity
    from peer.progress import Progress
    from peer.training.swarm import start_dht, state_record_validator
    from peer.training.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(
        run=run_cfg,
        run_id=args.run_id,
        home=home,
        data_dir=data_dir,
        corpus_dir=args.corpus_dir,
        data=args.data,
        device=device,
        optimizer=optimizer,
        precision=args.precision,
        compression=args.compression,
        max_rounds=args.max_rounds,
        max_seconds=args.max_seconds,
        behaviour=behaviour,
        eval_pages=args.eval_pages,
        probe_loss=args.probe_loss,
        threads=args.threads,
    )
    id_file = identity_path(home)
    load_or_create_identity(id_file)  # one libp2p key: the DHT's and the publisher's peer id are the same

    chain = registration = None
    publisher = dht = ranks = trainer = None
    clean = False
    try:
        if nproc > 1:  # before the DHT and publisher start: the ranks are plain children of this process
            from peer.training.ranks import PeerRanks

            ranks = PeerRanks.start(
                run_cfg, nproc=nproc, device=device, optimizer=optimizer, threads=args.threads
            )
        if chain_cfg is not None:
            chain = connect(chain_cfg)
            # the coldkey is read (and unlocked, if encrypted) only if the hotkey is not registered yet
            needs_cold = args.register_burn or chain_cfg.is_local
            coldkey = (lambda: load_coldkey(wallet, "registering the hotkey")) if needs_cold else None
            registration = ensure_registered(
                chain, chain_cfg.netuid, keypair, coldkey, burn=args.register_burn
            )
        if chain is not None and not args.initial_peers:
            args.initial_peers = _discover_initial_peers(chain_cfg, args.run_id, keypair.ss58_address)
        dht = start_dht(
            initial_peers=args.initial_peers,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            identity_path=str(id_file),
            record_validators=[state_record_validator(args.run_id)],
        )
        # hivemind sets SIGINT to ignored in some paths; make Ctrl-C and SIGTERM stop the peer cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        print(
            f"peer id {dht.peer_id.to_base58()}; others join with: --initial-peers {' '.join(maddrs)}",
            file=sys.stderr,
            flush=True,
        )
        identity = {"dht_maddrs": maddrs, "nproc_per_node": nproc}
        if not args.no_publish:
            from peer.net.publisher import start_publisher

            publisher = start_publisher(home / "outbox", id_file, args.publisher_listen)
            identity["publisher_maddrs"] = publisher.multiaddrs
            if chain is not None:
                addr = commit_address(publisher.addrs, args.publisher_announce, local=chain_cfg.is_local)
                ensure_commitment(chain, chain_cfg.netuid, keypair, publisher.commitment(addr))
                identity["committed"] = publisher.commitment(addr).multiaddr
        if registration is not None:
            identity.update(uid=registration.uid, netuid=registration.netuid)
        clock = _make_clock(chain, args, run_cfg)
        if publisher is not None:  # the signed hotkey <-> peer id binding validators check on every fetch
            publisher.publish_identity(
                keypair, run_id=args.run_id, round_=clock.current_round(), dht_addrs=maddrs
            )
        tracker = make_tracker(
            tracking,
            run_id=args.run_id,
            job_type="peer",
            name=keypair.ss58_address[:8],
            config={
                "config": run_cfg.name,
                "nproc_per_node": nproc,
                "behaviour": behaviour.value,
                "device": device,
                "optimizer": optimizer,
                "averaging": args.averaging,
                "uid": identity.get("uid"),
            },
            default_dir=home,
        )
        if args.averaging == "sync":
            from peer.training.sync import run_sync

            run_sync(
                cfg,
                keypair=keypair,
                dht=dht,
                tracker=tracker,
                clock=clock,
                target_batch_size=args.sync_target_batch,
            )
            return 0
        trainer = Trainer(
            cfg,
            keypair=keypair,
            clock=clock,
            dht=dht,
            tracker=tracker,
            progress=Progress(keypair.ss58_address[:8]),
            identity=identity,
            publisher=publisher,
            ranks=ranks,
            voters=None
            if chain is None
            else RegisteredHotkeys(chain, chain_cfg.netuid, ttl_s=run_cfg.train.round_seconds),
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the averager's start set it to ignored
        trainer.run()
        clean = True
    except (KeyboardInterrupt, RuntimeError):
        failure = ranks.error() if ranks is not None else None
        if failure is not None:
            raise failure from None  # one line: which rank died, how to resume
        raise
    finally:
        if ranks is not None:
            stop = trainer.state.sharded.stop if trainer is not None else None
            ranks.close(clean=clean, stop=stop)
        if publisher is not None:
            publisher.stop()
        if dht is not None:
            dht.shutdown()
        if chain is not None:
            chain.close()
    return 0


def _check_nproc(args, device: str, run_cfg) -> int:
    """``--nproc-per-node``, defaulted and checked before anything starts."""
    from peer.training.ranks import check_nproc, default_nproc

    if args.nproc_per_node is not None:
        nproc = args.nproc_per_node
    else:  # sync mode runs one process; DiLoCo takes every visible GPU
        nproc = default_nproc(device) if args.averaging == "diloco" else 1
    check_nproc(nproc, device, run_cfg.train.batch_size)
    if nproc > 1 and args.averaging != "diloco":
        raise ConfigError(f"--nproc-per-node {nproc} needs --averaging diloco (sync mode runs one process)")
    return nproc


def _make_clock(chain, args, run_cfg):
    """The chain's clock (round = block // round_blocks, seed = block hash) or, without a chain, wall time."""
    if chain is None:
        from peer.training.clock import WallClock

        return WallClock(
            run_id=args.run_id, round_seconds=run_cfg.train.round_seconds, genesis=args.round_genesis
        )
    from peer.chain.clock import ChainClock

    round_blocks = args.round_blocks or max(1, round(run_cfg.train.round_seconds / chain.block_time))
    return ChainClock(chain=chain, round_blocks=round_blocks)


def _discover_initial_peers(chain_cfg, run_id: str, own_hotkey: str) -> list[str]:
    """Join by netuid: live DHT addresses from the chain's commitments (peer.net.discovery, run in its own
    process: it uses py-libp2p). None found = this peer starts the swarm."""
    from peer.net.discovery import discover_in_subprocess

    found = discover_in_subprocess(chain_cfg, run_id=run_id, exclude_hotkey=own_hotkey)
    if found.initial_peers:
        log.info(
            "found %d live peer(s) of %d on subnet %d from the chain in %.1fs",
            found.live,
            found.candidates,
            chain_cfg.netuid,
            found.seconds,
        )
    else:
        why = "; ".join(f"{s['hotkey'][:8]}: {s['why']}" for s in found.skipped[:4]) or "no commitments"
        log.info("no live peer on subnet %d (%s): starting a new swarm", chain_cfg.netuid, why)
    return found.initial_peers
