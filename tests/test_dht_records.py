"""Hotkey-signed DHT records on real hivemind DHTs: forged and unsigned values are refused and counted.

hivemind runs in a child process (py-libp2p may be imported by other tests in this pytest process, and
the two cannot share one); the scenario prints one JSON line that the test checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def scenario() -> dict:
    import hivemind
    from hivemind.utils import get_dht_time
    from substrateinterface import Keypair

    from peer.net.dht_records import (
        HotkeyRecordValidator,
        dht_key,
        hotkey_subkey,
        read_announcements,
        sign_announcement,
        validator_rejections,
    )
    from peer.net.records import DHTAnnouncement

    run = "run-dht"
    key, other_key = dht_key(run, "state_hash"), dht_key(run, "progress")
    alice, mallory = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Mallory")

    def validator():
        return HotkeyRecordValidator(run_id=run, protected_keys=[key, other_key])

    maddrs = ["/ip4/127.0.0.1/tcp/0"]
    a = hivemind.DHT(start=True, host_maddrs=maddrs, record_validators=[validator()])
    peers = [str(m) for m in a.get_visible_maddrs()]
    b = hivemind.DHT(start=True, host_maddrs=maddrs, initial_peers=peers, record_validators=[validator()])
    evil = hivemind.DHT(start=True, host_maddrs=maddrs, initial_peers=peers)  # no validator: stores anything
    out: dict = {}
    try:
        exp = get_dht_time() + 60
        sub, val = sign_announcement(
            alice, key=key, run_id=run, round_=3, peer_id="QmAlice", value={"hash": "ab"}, expires_at=exp
        )
        out["honest_store"] = bool(b.store(key, val, exp, subkey=sub))
        # alice's genuine record re-stored to expire in a year: hivemind keeps the latest expiry per subkey,
        # so it would pin round 3 and refuse every later announcement of alice's (red team)
        out["pin_store"] = bool(evil.store(key, val, get_dht_time() + 365 * 86400, subkey=sub))
        exp4 = get_dht_time() + 60
        sub4, val4 = sign_announcement(
            alice, key=key, run_id=run, round_=4, peer_id="QmAlice", value={"hash": "cd"}, expires_at=exp4
        )
        out["next_round_store"] = bool(a.store(key, val4, exp4, subkey=sub4))

        forged = [
            # unsigned plain value under a protected key
            ("plain", "x" * 10, "not-a-hotkey"),
            # unsigned announcement under alice's subkey
            (
                "unsigned",
                DHTAnnouncement(
                    run_id=run, round=3, hotkey=alice.ss58_address, peer_id="QmX", key=key
                ).model_dump_json(),
                hotkey_subkey(alice.ss58_address),
            ),
            # mallory's signed record under alice's subkey
            (
                "wrong_hotkey",
                sign_announcement(
                    mallory, key=key, run_id=run, round_=3, peer_id="QmM", value={}, expires_at=exp
                )[1],
                hotkey_subkey(alice.ss58_address),
            ),
            # alice's record with a tampered payload (signature no longer matches)
            ("tampered", val.replace('"ab"', '"cd"'), sub),
            # alice's genuine record replayed under another protected key
            ("replayed_key", val, sub),
            # alice's record for another run
            (
                "other_run",
                sign_announcement(
                    alice, key=key, run_id="other-run", round_=3, peer_id="QmAlice", value={}, expires_at=exp
                )[1],
                sub,
            ),
        ]
        for name, value, subkey in forged:
            target_key = other_key if name == "replayed_key" else key
            evil.store(target_key, value, exp, subkey=subkey)
        got = b.get(key, latest=True)
        got_other = a.get(other_key, latest=True)
        out["subkeys"] = sorted(got.value.keys()) if got else []
        out["other_key_subkeys"] = sorted(got_other.value.keys()) if got_other else []
        anns = read_announcements(got.value if got else None, key=key, run_id=run)
        out["verified"] = {hk: [a_.round, a_.value] for hk, a_ in anns.items()}
        out["verified_registered_only"] = sorted(
            read_announcements(got.value if got else None, key=key, run_id=run, allowed={"5Other"})
        )
        rej_a, rej_b = validator_rejections(a), validator_rejections(b)
        out["rejections"] = {k: rej_a.get(k, 0) + rej_b.get(k, 0) for k in set(rej_a) | set(rej_b)}
        out["alive"] = a.is_alive() and b.is_alive()
    finally:
        for d in (evil, b, a):
            d.shutdown()
    return out


@pytest.mark.slow
def test_dht_refuses_forged_and_unsigned_records():
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "scenario"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    assert out["honest_store"] is True
    assert out["subkeys"] == [f"[hotkey:{alice}]"], out  # nothing forged got in next to it
    assert out["verified"] == {alice: [4, {"hash": "cd"}]}, out  # alice's newest genuine record
    # (the store itself reports False: the validator-less node keeps its pinned copy and refuses round 4,
    # but every node that validates refused the pin and holds round 4, and readers only see validated values)
    assert out["verified_registered_only"] == []  # alice is not among the registered hotkeys given
    assert out["other_key_subkeys"] == [], out  # replaying alice's record under another key failed
    rej = out["rejections"]
    for reason in ("unsigned", "wrong_hotkey", "bad_signature", "wrong_key", "wrong_run", "expiry_extended"):
        assert rej.get(reason, 0) >= 1, (reason, rej)
    assert out["alive"]


if __name__ == "__main__" and sys.argv[1:] == ["scenario"]:
    sys.path.insert(0, str(REPO))
    print(json.dumps(scenario()))
