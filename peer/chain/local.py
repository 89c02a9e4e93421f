"""LocalLedger: the embedded chain — one SQLite file (WAL) shared by every local process.

It follows the subtensor runtime's rules for what gradswarm uses, so code tested against it behaves the
same on a real chain (the contract suite runs both):

* **Blocks** advance with wall time: ``block = floor((now - genesis_time) / block_time)``. Block hashes
  are deterministic: ``blake2b-256(genesis_id || block)``. :meth:`LocalLedger.advance` moves genesis
  back (like Chopsticks' ``dev_newBlock``) for tests and demos; every process sees it.
* **Extrinsics are signed.** Every write is a :class:`SignedCall` (call name, JSON args, signer ss58,
  era block, random nonce) signed with sr25519 by the hotkey (register: the hotkey owns itself;
  set_commitment, weights) or the coldkey (burned_register: the coldkey owns the hotkey and pays any
  burn; add_stake, create_subnet). The ledger verifies the signature, that the
  era is recent (:data:`ERA_BLOCKS`) and that the call was not seen before (replay protection).
* **Concurrency**: each write is one ``BEGIN IMMEDIATE`` transaction with a busy timeout, so peers and
  validators in different processes can write at once; readers never block (WAL).
* **Registration** → the next free uid; when the subnet is full, the non-immune uid with the lowest
  pruning score is replaced (the runtime's score: last epoch's emission, i.e. incentive for miners and
  dividends for validators; ties → lower incentive, older registration, lower uid); the subnet
  owner's hotkey is never replaced (its weights, commits and commitment are cleared). A burn cost, if the subnet has one, is
  paid by the coldkey through ``burned_register`` and only with ``burn=True``.
* **Weights**: the runtime's checks (lengths, duplicates, known uids, version key, validator permit,
  min allowed weights, rate limit), stored max-upscaled like the runtime. Commit-reveal uses the
  runtime's commit hash and reveal window (:mod:`peer.chain.commit_reveal`).
* **Epochs** run lazily, before the first read or write after an epoch boundary: a stake-weighted,
  Yuma-like consensus (:mod:`peer.chain.yuma`) gives incentive, dividends and emission, credited to
  the neurons' stake, so a local run ends with rewards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from substrateinterface import Keypair, KeypairType

from peer.chain.base import (
    BadSignature,
    BurnRequired,
    ChainError,
    ChainUnreachable,
    CommitRevealError,
    Hyperparameters,
    InsufficientBalance,
    Metagraph,
    Neuron,
    NotRegistered,
    PermissionDenied,
    RateLimited,
    Registration,
    RegistrationError,
    RevealTooEarly,
    RevealTooLate,
    SubnetNotFound,
    SubnetParams,
    TxResult,
    WeightCommit,
    WeightsError,
    check_weights_shape,
)
from peer.chain.commit_reveal import commit_hash, epoch_of, max_upscale, reveal_window
from peer.chain.yuma import yuma_epoch

LEDGER_SPEC = 1
ERA_BLOCKS = 256
"""A signed call is valid for this many blocks after its era block (mortal era), and at least
:data:`ERA_MIN_SECONDS` of wall time on fast ledgers."""
ERA_MIN_SECONDS = 600.0
MAX_PENDING_COMMITS = 10
MAX_COMMITMENT_BYTES = 128

DEFAULTS = Hyperparameters(
    tempo=10,
    weights_rate_limit=0,
    commit_reveal_enabled=False,
    reveal_period_epochs=1,
    max_uids=256,
    immunity_period=100,
    min_allowed_weights=1,
    max_weights_limit=65535,
    weights_version_key=0,
    max_validators=64,
    burn=0,
    commitment_rate_limit=10,
)
"""LocalLedger subnet defaults: the runtime's, with short tempo and rate limits for local runs."""
EMISSION_PER_BLOCK = 10**9
"""Rao emitted per block on each local subnet (1 TAO), split 50/50 miners/validators each epoch."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subnets (
  netuid INTEGER PRIMARY KEY, owner TEXT NOT NULL, params TEXT NOT NULL,
  created_block INTEGER NOT NULL, last_epoch INTEGER NOT NULL, owner_hotkey TEXT);
CREATE TABLE IF NOT EXISTS neurons (
  netuid INTEGER NOT NULL, uid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL,
  registered_at INTEGER NOT NULL, last_update INTEGER NOT NULL, last_weights INTEGER,
  last_commit INTEGER, incentive REAL NOT NULL DEFAULT 0, dividends REAL NOT NULL DEFAULT 0,
  consensus REAL NOT NULL DEFAULT 0, emission INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (netuid, uid), UNIQUE (netuid, hotkey));
CREATE TABLE IF NOT EXISTS weights (
  netuid INTEGER NOT NULL, uid INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (netuid, uid));
CREATE TABLE IF NOT EXISTS commits (
  netuid INTEGER NOT NULL, hotkey TEXT NOT NULL, hash TEXT NOT NULL, commit_block INTEGER NOT NULL,
  first_reveal INTEGER NOT NULL, last_reveal INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS commits_by_hotkey ON commits (netuid, hotkey);
CREATE TABLE IF NOT EXISTS commitments (
  netuid INTEGER NOT NULL, hotkey TEXT NOT NULL, data BLOB NOT NULL, block INTEGER NOT NULL,
  PRIMARY KEY (netuid, hotkey));
CREATE TABLE IF NOT EXISTS stake (
  netuid INTEGER NOT NULL, hotkey TEXT NOT NULL, coldkey TEXT NOT NULL, amount INTEGER NOT NULL,
  PRIMARY KEY (netuid, hotkey, coldkey));
CREATE TABLE IF NOT EXISTS balances (address TEXT PRIMARY KEY, free INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (xt TEXT PRIMARY KEY, era INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SignedCall:
    """One ledger extrinsic: what is called, by whom, and the signer's sr25519 signature over it."""

    call: str
    args: dict
    signer: str
    era: int
    nonce: str
    signature: str = ""

    def payload(self, genesis_id: str) -> bytes:
        body = {
            "spec": LEDGER_SPEC,
            "genesis": genesis_id,
            "call": self.call,
            "args": self.args,
            "signer": self.signer,
            "era": self.era,
            "nonce": self.nonce,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def xt_hash(self, genesis_id: str) -> str:
        return hashlib.blake2b(self.payload(genesis_id), digest_size=32).hexdigest()


def sign_call(genesis_id: str, era: int, call: str, args: dict, signer: Keypair) -> SignedCall:
    """Build and sign a :class:`SignedCall` (what a wallet does before submitting)."""
    sc = SignedCall(call=call, args=args, signer=signer.ss58_address, era=era, nonce=secrets.token_hex(16))
    sig = signer.sign(sc.payload(genesis_id))
    return SignedCall(**{**asdict(sc), "signature": "0x" + bytes(sig).hex()})


def _params_to_json(hp: Hyperparameters) -> str:
    return json.dumps(asdict(hp), sort_keys=True)


def _params_from_json(raw: str) -> Hyperparameters:
    return Hyperparameters(**json.loads(raw))


class LocalLedger:
    """The embedded chain on one SQLite file. Safe to open from many processes at once.

    ``block_time`` applies when the file is created; an existing ledger keeps its own (every process
    must agree on the block height). ``busy_timeout`` is how long a writer waits for another writer:
    raise it if "database is locked" errors appear under many concurrent writers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        block_time: float = 1.0,
        busy_timeout: float = 30.0,
        genesis_id: str | None = None,
    ):
        if block_time <= 0:
            raise ChainError(f"ledger block time must be > 0 seconds, got {block_time}")
        if genesis_id is not None and not re.fullmatch(r"[0-9a-f]{32}", genesis_id):
            raise ChainError(f"ledger genesis id must be 32 lowercase hex digits, got {genesis_id!r}")
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as e:
            raise ChainUnreachable(f"cannot open ledger {self.path}: {e} (check --ledger.path)") from None
        self._lock = threading.RLock()
        with self._tx():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                meta = {
                    "spec": str(LEDGER_SPEC),
                    # a fixed id gives a reproducible chain (same block hashes, so the same round seeds)
                    "genesis_id": genesis_id or secrets.token_hex(16),
                    "genesis_time": repr(time.time()),
                    "block_time": repr(float(block_time)),
                }
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        if int(meta["spec"]) != LEDGER_SPEC:
            raise ChainError(f"ledger {self.path} has spec {meta['spec']}, this code reads {LEDGER_SPEC}")
        self.genesis_id: str = meta["genesis_id"]
        self.block_time: float = float(meta["block_time"])
        self.era_blocks = max(ERA_BLOCKS, math.ceil(ERA_MIN_SECONDS / self.block_time))

    # ------------------------------------------------------------------------------ plumbing
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, waits busy_timeout)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise ChainUnreachable(f"ledger {self.path} is locked or unreadable: {e}") from None
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _genesis_time(self) -> float:
        return float(self._q("SELECT value FROM meta WHERE key='genesis_time'")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------ blocks
    def block(self) -> int:
        return max(0, math.floor((time.time() - self._genesis_time()) / self.block_time))

    def block_hash(self, n: int) -> str:
        if n < 0 or n > self.block():
            raise ChainError(f"block {n} does not exist yet (head is #{self.block()})")
        data = bytes.fromhex(self.genesis_id) + int(n).to_bytes(8, "little")
        return "0x" + hashlib.blake2b(data, digest_size=32).hexdigest()

    def advance(self, n: int) -> int:
        """Dev tool: move the head forward by ``n`` blocks now (for every process); returns the head."""
        if n < 0:
            raise ChainError("can only advance by n >= 0 blocks")
        with self._tx() as db:
            gt = float(db.execute("SELECT value FROM meta WHERE key='genesis_time'").fetchone()[0])
            db.execute("UPDATE meta SET value=? WHERE key='genesis_time'", (repr(gt - n * self.block_time),))
        return self.block()

    # ------------------------------------------------------------------------------ signed calls
    def sign(self, call: str, args: dict, signer: Keypair) -> SignedCall:
        return sign_call(self.genesis_id, self.block(), call, args, signer)

    def submit(self, xt: SignedCall) -> TxResult:
        """Verify and apply one signed call atomically. Raises a typed ChainError if refused."""
        return self._apply(xt)[0]

    def _apply(self, xt: SignedCall) -> tuple[TxResult, object]:
        handler = _HANDLERS.get(xt.call)
        if handler is None:
            raise ChainError(f"unknown ledger call {xt.call!r}")
        try:
            kp = Keypair(ss58_address=xt.signer, crypto_type=KeypairType.SR25519)
            ok = kp.verify(xt.payload(self.genesis_id), bytes.fromhex(xt.signature.removeprefix("0x")))
        except ValueError as e:
            raise BadSignature(f"{xt.call}: bad signer address or signature encoding ({e})") from None
        if not ok:
            raise BadSignature(f"{xt.call}: signature does not match signer {xt.signer}")
        with self._tx() as db:
            cur = self.block()
            era = self.era_blocks
            if not (cur - era <= xt.era <= cur + 1):
                raise BadSignature(
                    f"{xt.call}: signed at block {xt.era}, head is #{cur}: the call is stale, sign it again"
                )
            h = xt.xt_hash(self.genesis_id)
            if db.execute("SELECT 1 FROM seen WHERE xt=?", (h,)).fetchone():
                raise BadSignature(f"{xt.call}: this signed call was already applied (replay)")
            db.execute("INSERT INTO seen VALUES (?, ?)", (h, xt.era))
            db.execute("DELETE FROM seen WHERE era < ?", (cur - era - 1,))
            netuid = xt.args.get("netuid")
            if netuid is not None and xt.call != "set_hyperparameters":
                _epoch(db, cur, netuid)  # an epoch that is due runs before the call, as on chain
            value = handler(self, db, cur, xt.signer, xt.args)
        return TxResult(call=xt.call, block=cur), value

    def _call(self, call: str, args: dict, signer: Keypair) -> TxResult:
        return self.submit(self.sign(call, args, signer))

    # ------------------------------------------------------------------------------ subnets
    def create_subnet(
        self, owner: Keypair, params: SubnetParams | None = None, owner_hotkey: Keypair | None = None
    ) -> int:
        """Create a subnet owned by ``owner`` (signed by it); ``owner_hotkey`` becomes uid 0."""
        p = params or SubnetParams()
        changes = {k: v for k, v in asdict(p).items() if k != "extra" and v is not None}
        changes.update(p.extra)
        args = {"params": changes, "owner_hotkey": owner_hotkey.ss58_address if owner_hotkey else None}
        _, netuid = self._apply(self.sign("register_network", args, owner))
        return int(netuid)

    def set_hyperparameters(self, netuid: int, admin: Keypair, **changes) -> TxResult:
        """Change subnet parameters (names of :class:`Hyperparameters`); only the owner may."""
        return self._call("set_hyperparameters", {"netuid": netuid, "changes": changes}, admin)

    def subnets(self) -> list[int]:
        return [int(r[0]) for r in self._q("SELECT netuid FROM subnets ORDER BY netuid")]

    def hyperparameters(self, netuid: int) -> Hyperparameters:
        rows = self._q("SELECT params FROM subnets WHERE netuid=?", (netuid,))
        if not rows:
            raise SubnetNotFound(self._no_subnet(netuid))
        return _params_from_json(rows[0][0])

    def _no_subnet(self, netuid: int) -> str:
        have = self.subnets()
        return (
            f"subnet {netuid} does not exist on ledger {self.path} (subnets: {have or 'none'}; "
            f"create one with `peer chain create-subnet`)"
        )

    # ------------------------------------------------------------------------------ balances/stake
    def fund(self, address: str, amount: int) -> int:
        """Dev faucet (local ledger only): credit ``amount`` rao to ``address``; returns the balance."""
        if amount < 0:
            raise ChainError("fund amount must be >= 0")
        with self._tx() as db:
            db.execute(
                "INSERT INTO balances VALUES (?, ?) ON CONFLICT(address) DO UPDATE SET free = free + ?",
                (address, amount, amount),
            )
        return self.balance(address)

    def balance(self, address: str) -> int:
        rows = self._q("SELECT free FROM balances WHERE address=?", (address,))
        return int(rows[0][0]) if rows else 0

    def add_stake(self, netuid: int, hotkey: str, coldkey: Keypair, amount: int) -> TxResult:
        return self._call("add_stake", {"netuid": netuid, "hotkey": hotkey, "amount": int(amount)}, coldkey)

    # ------------------------------------------------------------------------------ registration
    def uid_of(self, netuid: int, hotkey: str) -> int | None:
        rows = self._q("SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (netuid, hotkey))
        return int(rows[0][0]) if rows else None

    def register(
        self, netuid: int, hotkey: Keypair, coldkey: Keypair | None = None, *, burn: bool = False
    ) -> Registration:
        hp = self.hyperparameters(netuid)
        uid = self.uid_of(netuid, hotkey.ss58_address)
        if uid is None:
            if hp.burn > 0 and (not burn or coldkey is None):
                raise BurnRequired(
                    f"registering on subnet {netuid} burns {hp.burn / 1e9:g} TAO from the coldkey: "
                    "pass the coldkey and the explicit burn flag (--register.burn) to pay it"
                )
            if coldkey is not None:  # the coldkey signs: it owns the hotkey and pays any burn
                self._call("burned_register", {"netuid": netuid, "hotkey": hotkey.ss58_address}, coldkey)
            else:  # the hotkey signs for itself and is its own owner
                self._call("register", {"netuid": netuid}, hotkey)
            new = True
        else:
            new = False
        row = self._q(
            "SELECT uid, coldkey, registered_at FROM neurons WHERE netuid=? AND hotkey=?",
            (netuid, hotkey.ss58_address),
        )
        if not row:  # replaced right after registering (full subnet, heavy churn)
            raise RegistrationError(f"hotkey {hotkey.ss58_address} was replaced right after registering")
        uid, ck, at = row[0]
        return Registration(netuid=netuid, uid=uid, hotkey=hotkey.ss58_address, coldkey=ck, block=at, new=new)

    # ------------------------------------------------------------------------------ commitments
    def set_commitment(self, netuid: int, hotkey: Keypair, data: bytes) -> TxResult:
        data = bytes(data)
        if len(data) > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment is {len(data)} bytes; at most {MAX_COMMITMENT_BYTES} fit")
        return self._call("set_commitment", {"netuid": netuid, "data": data.hex()}, hotkey)

    def commitments(self, netuid: int) -> dict[str, bytes]:
        rows = self._q("SELECT hotkey, data FROM commitments WHERE netuid=?", (netuid,))
        return {hk: bytes(d) for hk, d in rows}

    # ------------------------------------------------------------------------------ weights
    def set_weights(
        self, netuid: int, hotkey: Keypair, uids: Sequence[int], weights: Sequence[int], version_key: int
    ) -> TxResult:
        u, w = check_weights_shape(uids, weights)
        args = {"netuid": netuid, "uids": u, "weights": w, "version_key": int(version_key)}
        return self._call("set_weights", args, hotkey)

    def commit_weights(
        self,
        netuid: int,
        hotkey: Keypair,
        uids: Sequence[int],
        weights: Sequence[int],
        salt: Sequence[int],
        version_key: int,
    ) -> WeightCommit:
        u, w = check_weights_shape(uids, weights)
        h = commit_hash(hotkey.public_key, netuid, u, w, list(salt), int(version_key))
        self._call("commit_weights", {"netuid": netuid, "hash": h}, hotkey)
        for c in self.pending_commits(netuid, hotkey.ss58_address):
            if c.hash == h:
                return c
        raise ChainError("weight commit vanished right after committing")  # pragma: no cover

    def reveal_weights(
        self,
        netuid: int,
        hotkey: Keypair,
        uids: Sequence[int],
        weights: Sequence[int],
        salt: Sequence[int],
        version_key: int,
    ) -> TxResult:
        u, w = check_weights_shape(uids, weights)
        args = {"netuid": netuid, "uids": u, "weights": w, "salt": [int(s) for s in salt]}
        args["version_key"] = int(version_key)
        return self._call("reveal_weights", args, hotkey)

    def pending_commits(self, netuid: int, hotkey: str) -> list[WeightCommit]:
        rows = self._q(
            "SELECT hash, commit_block, first_reveal, last_reveal FROM commits "
            "WHERE netuid=? AND hotkey=? ORDER BY rowid",
            (netuid, hotkey),
        )
        return [
            WeightCommit(hash=h, commit_block=b, first_reveal_block=f, last_reveal_block=x)
            for h, b, f, x in rows
        ]

    def weights(self, netuid: int) -> dict[int, list[tuple[int, int]]]:
        rows = self._q("SELECT uid, row FROM weights WHERE netuid=? ORDER BY uid", (netuid,))
        return {int(uid): [(int(a), int(b)) for a, b in json.loads(row)] for uid, row in rows}

    # ------------------------------------------------------------------------------ metagraph
    def metagraph(self, netuid: int) -> Metagraph:
        self._run_due_epochs(netuid)
        with self._lock:
            self._db.execute("BEGIN")  # one consistent snapshot for all reads
            try:
                cur = self.block()
                hp = self.hyperparameters(netuid)
                rows = self._db.execute(
                    "SELECT n.uid, n.hotkey, n.coldkey, COALESCE(SUM(s.amount), 0), n.last_update, "
                    "n.registered_at, n.incentive, n.dividends, n.consensus, n.emission "
                    "FROM neurons n LEFT JOIN stake s ON s.netuid = n.netuid AND s.hotkey = n.hotkey "
                    "WHERE n.netuid=? GROUP BY n.uid ORDER BY n.uid",
                    (netuid,),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        permits = _permits([r[3] for r in rows], hp.max_validators)
        neurons = tuple(
            Neuron(
                uid=r[0],
                hotkey=r[1],
                coldkey=r[2],
                stake=int(r[3]),
                validator_permit=permits[i],
                last_update=r[4],
                registered_at=r[5],
                incentive=r[6],
                dividends=r[7],
                consensus=r[8],
                emission=int(r[9]),
            )
            for i, r in enumerate(rows)
        )
        return Metagraph(netuid=netuid, block=cur, neurons=neurons)

    def incentives(self, netuid: int) -> dict[int, float]:
        """uid -> incentive of the last completed epoch (runs any epoch that is due first)."""
        return {nr.uid: nr.incentive for nr in self.metagraph(netuid).neurons}

    def _run_due_epochs(self, netuid: int) -> None:
        rows = self._q("SELECT params, last_epoch FROM subnets WHERE netuid=?", (netuid,))
        if not rows:
            raise SubnetNotFound(self._no_subnet(netuid))
        hp = _params_from_json(rows[0][0])
        if epoch_of(self.block(), netuid, hp.tempo) <= rows[0][1]:
            return
        with self._tx() as db:
            _epoch(db, self.block(), netuid)

    def close_epoch_now(self, netuid: int) -> None:
        """Dev tool: run this subnet's epoch now on the current weights (tests, demos)."""
        with self._tx() as db:
            _epoch(db, self.block(), netuid, force=True)


# ---------------------------------------------------------------------------------- call handlers
def _subnet(db: sqlite3.Connection, netuid: int) -> tuple[str, Hyperparameters]:
    row = db.execute("SELECT owner, params FROM subnets WHERE netuid=?", (netuid,)).fetchone()
    if row is None:
        raise SubnetNotFound(f"subnet {netuid} does not exist (create it with `peer chain create-subnet`)")
    return row[0], _params_from_json(row[1])


def _neuron(db: sqlite3.Connection, netuid: int, hotkey: str) -> tuple:
    row = db.execute(
        "SELECT uid, last_update, last_commit FROM neurons WHERE netuid=? AND hotkey=?", (netuid, hotkey)
    ).fetchone()
    if row is None:
        raise NotRegistered(
            f"hotkey {hotkey} is not registered on subnet {netuid}: register it first "
            f"(`peer chain register --netuid {netuid}`)"
        )
    return row


def _permits(stakes: Sequence[int], max_validators: int) -> list[bool]:
    n = len(stakes)
    if n <= max_validators:
        return [True] * n
    top = sorted(range(n), key=lambda i: (-stakes[i], i))[:max_validators]
    keep = set(top)
    return [i in keep for i in range(n)]


def _h_register_network(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> int:
    fields = set(Hyperparameters.__dataclass_fields__)
    unknown = set(args["params"]) - fields
    if unknown:
        raise ChainError(f"unknown subnet parameters {sorted(unknown)}; known: {sorted(fields)}")
    hp = Hyperparameters(**{**asdict(DEFAULTS), **args["params"]})
    _validate_params(hp)
    netuid = (db.execute("SELECT MAX(netuid) FROM subnets").fetchone()[0] or 0) + 1
    db.execute(
        "INSERT INTO subnets VALUES (?, ?, ?, ?, ?, ?)",
        (netuid, signer, _params_to_json(hp), cur, epoch_of(cur, netuid, hp.tempo), args.get("owner_hotkey")),
    )
    if args.get("owner_hotkey"):
        _append_neuron(db, cur, netuid, args["owner_hotkey"], signer, hp)
    return netuid


def _validate_params(hp: Hyperparameters) -> None:
    for name in ("tempo", "max_uids", "reveal_period_epochs", "max_validators"):
        if getattr(hp, name) < 1:
            raise ChainError(f"subnet parameter {name} must be >= 1, got {getattr(hp, name)}")
    for name in (
        "weights_rate_limit",
        "immunity_period",
        "burn",
        "commitment_rate_limit",
        "weights_version_key",
    ):
        if getattr(hp, name) < 0:
            raise ChainError(f"subnet parameter {name} must be >= 0, got {getattr(hp, name)}")


def _h_set_hyperparameters(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    owner, hp = _subnet(db, args["netuid"])
    if signer != owner:
        raise PermissionDenied(
            f"only the owner of subnet {args['netuid']} ({owner}) may change its parameters"
        )
    unknown = set(args["changes"]) - set(Hyperparameters.__dataclass_fields__)
    if unknown:
        raise ChainError(f"unknown subnet parameters {sorted(unknown)}")
    new = Hyperparameters(**{**asdict(hp), **args["changes"]})
    _validate_params(new)
    db.execute("UPDATE subnets SET params=? WHERE netuid=?", (_params_to_json(new), args["netuid"]))


def _append_neuron(db, cur: int, netuid: int, hotkey: str, coldkey: str, hp: Hyperparameters) -> int:
    if db.execute("SELECT 1 FROM neurons WHERE netuid=? AND hotkey=?", (netuid, hotkey)).fetchone():
        raise RegistrationError(f"hotkey {hotkey} is already registered on subnet {netuid}")
    n = db.execute("SELECT COUNT(*) FROM neurons WHERE netuid=?", (netuid,)).fetchone()[0]
    if n < hp.max_uids:
        uid = n
    else:
        row = db.execute(
            "SELECT uid, hotkey FROM neurons WHERE netuid=? AND ? - registered_at >= ? AND hotkey IS NOT "
            "(SELECT owner_hotkey FROM subnets WHERE netuid=?) "
            "ORDER BY emission ASC, incentive ASC, registered_at ASC, uid ASC LIMIT 1",
            (netuid, cur, hp.immunity_period, netuid),
        ).fetchone()
        if row is None:
            raise RegistrationError(
                f"subnet {netuid} is full ({hp.max_uids} uids) and every uid is still immune "
                f"(immunity_period {hp.immunity_period} blocks): try again later"
            )
        uid, old = row
        db.execute("DELETE FROM neurons WHERE netuid=? AND uid=?", (netuid, uid))
        db.execute("DELETE FROM weights WHERE netuid=? AND uid=?", (netuid, uid))
        db.execute("DELETE FROM commits WHERE netuid=? AND hotkey=?", (netuid, old))
        db.execute("DELETE FROM commitments WHERE netuid=? AND hotkey=?", (netuid, old))
    db.execute(
        "INSERT INTO neurons (netuid, uid, hotkey, coldkey, registered_at, last_update) VALUES (?, ?, ?, ?, ?, ?)",
        (netuid, uid, hotkey, coldkey, cur, cur),
    )
    return uid


def _h_register(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    _, hp = _subnet(db, args["netuid"])
    if hp.burn > 0:
        raise BurnRequired(
            f"subnet {args['netuid']} charges a burn: use burned_register (signed by the coldkey)"
        )
    _append_neuron(db, cur, args["netuid"], signer, signer, hp)


def _debit(db, address: str, amount: int, what: str) -> None:
    row = db.execute("SELECT free FROM balances WHERE address=?", (address,)).fetchone()
    free = int(row[0]) if row else 0
    if free < amount:
        raise InsufficientBalance(
            f"{what} needs {amount / 1e9:g} TAO but coldkey {address} holds {free / 1e9:g} TAO: fund it first"
        )
    db.execute("UPDATE balances SET free = free - ? WHERE address=?", (amount, address))


def _h_burned_register(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    _, hp = _subnet(db, args["netuid"])
    if hp.burn > 0:
        _debit(db, signer, hp.burn, f"registration on subnet {args['netuid']}")
    _append_neuron(db, cur, args["netuid"], args["hotkey"], signer, hp)


def _h_add_stake(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    _subnet(db, args["netuid"])
    amount = int(args["amount"])
    if amount <= 0:
        raise ChainError("stake amount must be > 0 rao")
    _neuron(db, args["netuid"], args["hotkey"])
    _debit(db, signer, amount, "add_stake")
    db.execute(
        "INSERT INTO stake VALUES (?, ?, ?, ?) ON CONFLICT(netuid, hotkey, coldkey) DO UPDATE SET amount = amount + ?",
        (args["netuid"], args["hotkey"], signer, amount, amount),
    )


def _h_set_commitment(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    netuid = args["netuid"]
    _, hp = _subnet(db, netuid)
    _neuron(db, netuid, signer)
    row = db.execute("SELECT block FROM commitments WHERE netuid=? AND hotkey=?", (netuid, signer)).fetchone()
    if row is not None and cur - row[0] < hp.commitment_rate_limit:
        raise RateLimited(
            f"commitment rate limit: last commitment at block {row[0]}, next allowed at block "
            f"{row[0] + hp.commitment_rate_limit} (head #{cur})"
        )
    data = bytes.fromhex(args["data"])
    db.execute(
        "INSERT INTO commitments VALUES (?, ?, ?, ?) ON CONFLICT(netuid, hotkey) DO UPDATE SET data=?, block=?",
        (netuid, signer, data, cur, data, cur),
    )


def _apply_weights(db, cur: int, netuid: int, uid: int, hp: Hyperparameters, args: dict) -> None:
    u, w = check_weights_shape(args["uids"], args["weights"])
    n = db.execute("SELECT COUNT(*) FROM neurons WHERE netuid=?", (netuid,)).fetchone()[0]
    bad = [x for x in u if x >= n]
    if bad:
        raise WeightsError(f"uids {bad} do not exist on subnet {netuid} (it has {n} uids)")
    if int(args["version_key"]) < hp.weights_version_key:
        raise WeightsError(
            f"version_key {args['version_key']} is below the subnet's {hp.weights_version_key}: update gradswarm"
        )
    self_only = u == [uid]
    if not self_only and len(u) < min(hp.min_allowed_weights, n):
        raise WeightsError(f"{len(u)} weights, the subnet requires at least {hp.min_allowed_weights}")
    if not self_only:
        stakes = [
            r[0]
            for r in db.execute(
                "SELECT COALESCE(SUM(s.amount), 0) FROM neurons n LEFT JOIN stake s "
                "ON s.netuid = n.netuid AND s.hotkey = n.hotkey WHERE n.netuid=? GROUP BY n.uid ORDER BY n.uid",
                (netuid,),
            )
        ]
        if not _permits(stakes, hp.max_validators)[uid]:
            raise WeightsError(f"uid {uid} has no validator permit on subnet {netuid}: stake more to get one")
    stored = max_upscale(w)
    row = sorted(zip(u, stored, strict=True))
    db.execute(
        "INSERT INTO weights VALUES (?, ?, ?) ON CONFLICT(netuid, uid) DO UPDATE SET row=?",
        (netuid, uid, json.dumps(row), json.dumps(row)),
    )
    db.execute(
        "UPDATE neurons SET last_update=?, last_weights=? WHERE netuid=? AND uid=?", (cur, cur, netuid, uid)
    )


def _h_set_weights(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    netuid = args["netuid"]
    _, hp = _subnet(db, netuid)
    if hp.commit_reveal_enabled:
        raise CommitRevealError(f"subnet {netuid} uses commit-reveal: use commit_weights + reveal_weights")
    uid, last, _ = _neuron(db, netuid, signer)
    if cur - last < hp.weights_rate_limit:  # registration counts as an update, as in the runtime
        raise RateLimited(
            f"weights rate limit: uid {uid} was updated at block {last}; next allowed at block "
            f"{last + hp.weights_rate_limit} (head #{cur})"
        )
    _apply_weights(db, cur, netuid, uid, hp, args)


def _h_commit_weights(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    netuid = args["netuid"]
    _, hp = _subnet(db, netuid)
    if not hp.commit_reveal_enabled:
        raise CommitRevealError(f"subnet {netuid} has commit-reveal off: use set_weights")
    uid, _, last = _neuron(db, netuid, signer)
    if last is not None and cur - last < hp.weights_rate_limit:
        raise RateLimited(
            f"commit rate limit: uid {uid} committed at block {last}; next allowed at block "
            f"{last + hp.weights_rate_limit} (head #{cur})"
        )
    db.execute("DELETE FROM commits WHERE netuid=? AND hotkey=? AND last_reveal < ?", (netuid, signer, cur))
    k = db.execute("SELECT COUNT(*) FROM commits WHERE netuid=? AND hotkey=?", (netuid, signer)).fetchone()[0]
    if k >= MAX_PENDING_COMMITS:
        raise RateLimited(f"{k} unrevealed weight commits pending: reveal them first")
    first, last_reveal = reveal_window(cur, netuid, hp.tempo, hp.reveal_period_epochs)
    db.execute(
        "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
        (netuid, signer, args["hash"], cur, first, last_reveal),
    )
    db.execute("UPDATE neurons SET last_commit=? WHERE netuid=? AND uid=?", (cur, netuid, uid))


def _h_reveal_weights(ledger: LocalLedger, db, cur: int, signer: str, args: dict) -> None:
    netuid = args["netuid"]
    _, hp = _subnet(db, netuid)
    if not hp.commit_reveal_enabled:
        raise CommitRevealError(f"subnet {netuid} has commit-reveal off: use set_weights")
    uid, _, _ = _neuron(db, netuid, signer)
    pub = Keypair(ss58_address=signer, crypto_type=KeypairType.SR25519).public_key
    h = commit_hash(pub, netuid, args["uids"], args["weights"], args["salt"], args["version_key"])
    rows = db.execute(
        "SELECT rowid, first_reveal, last_reveal FROM commits WHERE netuid=? AND hotkey=? AND hash=?",
        (netuid, signer, h),
    ).fetchall()
    if not rows:
        any_left = db.execute(
            "SELECT COUNT(*) FROM commits WHERE netuid=? AND hotkey=?", (netuid, signer)
        ).fetchone()
        raise RevealTooLate(
            "no pending weight commit matches these uids/weights/salt/version_key"
            + ("" if any_left[0] else " (there are no pending commits at all)")
        )
    rowid, first, last = rows[0]
    if cur < first:
        raise RevealTooEarly(f"reveal too early: the window opens at block {first} (head #{cur})")
    if cur > last:
        db.execute("DELETE FROM commits WHERE rowid=?", (rowid,))
        raise RevealTooLate(f"the commit expired: its reveal window was blocks {first}..{last} (head #{cur})")
    _apply_weights(db, cur, netuid, uid, hp, args)
    db.execute("DELETE FROM commits WHERE rowid=?", (rowid,))


def _epoch(db, cur: int, netuid: int, force: bool = False) -> None:
    row = db.execute("SELECT params, last_epoch FROM subnets WHERE netuid=?", (netuid,)).fetchone()
    if row is None:
        return
    hp, last_epoch = _params_from_json(row[0]), row[1]
    e = epoch_of(cur, netuid, hp.tempo)
    epochs = e - last_epoch
    if epochs <= 0 and not force:
        return
    epochs = max(epochs, 1)
    rows = db.execute(
        "SELECT n.uid, n.hotkey, n.coldkey, COALESCE(SUM(s.amount), 0) FROM neurons n LEFT JOIN stake s "
        "ON s.netuid = n.netuid AND s.hotkey = n.hotkey WHERE n.netuid=? GROUP BY n.uid ORDER BY n.uid",
        (netuid,),
    ).fetchall()
    n = len(rows)
    stakes = [int(r[3]) for r in rows]
    wts = {
        int(uid): [(int(a), int(b)) for a, b in json.loads(r)]
        for uid, r in db.execute("SELECT uid, row FROM weights WHERE netuid=?", (netuid,))
    }
    res = yuma_epoch(n, stakes, _permits(stakes, hp.max_validators), wts)
    total = EMISSION_PER_BLOCK * (hp.tempo + 1) * epochs
    for i, (uid, hotkey, coldkey, _) in enumerate(rows):
        em = int(total * (0.5 * res.incentive[i] + 0.5 * res.dividends[i]))
        db.execute(
            "UPDATE neurons SET incentive=?, dividends=?, consensus=?, emission=? WHERE netuid=? AND uid=?",
            (res.incentive[i], res.dividends[i], res.consensus[i], em, netuid, uid),
        )
        if em > 0:
            db.execute(
                "INSERT INTO stake VALUES (?, ?, ?, ?) ON CONFLICT(netuid, hotkey, coldkey) "
                "DO UPDATE SET amount = amount + ?",
                (netuid, hotkey, coldkey, em, em),
            )
    db.execute("UPDATE subnets SET last_epoch=? WHERE netuid=?", (max(e, last_epoch), netuid))


_HANDLERS = {
    "register_network": _h_register_network,
    "set_hyperparameters": _h_set_hyperparameters,
    "register": _h_register,
    "burned_register": _h_burned_register,
    "add_stake": _h_add_stake,
    "set_commitment": _h_set_commitment,
    "set_weights": _h_set_weights,
    "commit_weights": _h_commit_weights,
    "reveal_weights": _h_reveal_weights,
}
