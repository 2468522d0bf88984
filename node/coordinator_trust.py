"""Which coordinator key a node trusts: the pin it was given, or (only when asked) the first key it saw.

A node obeys its coordinator on the data plane (it serves the trainer the coordinator names) and signs work
for it, so it must know it talks to the coordinator its operator meant. The join command carries the
coordinator's key fingerprint (`--coordinator-key FINGERPRINT` or `--coordinator FINGERPRINT@HOST:PORT`).
Without one, `--trust-on-first-use` keeps the first key seen at an address in `known_coordinators` next to the
node's key file, as SSH's known_hosts does, and refuses a changed key later.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import CoordinatorTrustError, SwarmError
from swarm.identity import fingerprint

KNOWN_COORDINATORS = "known_coordinators"
_PIN = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True)
class CoordinatorTrust:
    """`pin`: hex digits the key's SHA-256 must start with (its fingerprint, or more of the hash); else
    `known_file`: the trust-on-first-use file."""

    address: str
    pin: str | None = None
    known_file: Path | None = None

    def check(self, public_key: bytes) -> None:
        """Raise CoordinatorTrustError, naming both fingerprints, unless `public_key` is the trusted one."""
        presented = fingerprint(public_key)
        if self.pin is not None:
            if not hashlib.sha256(public_key).hexdigest().startswith(self.pin):
                raise CoordinatorTrustError(
                    f"the coordinator at {self.address} presented key {presented}, but this node was told to trust "
                    f"key {self.pin} (--coordinator-key): refusing to join; check the fingerprint "
                    "`swarm-coordinator run` printed (an impostor, or a coordinator with another key, answers here)")
            return
        known = self.known_key()
        if known is not None and known != public_key:
            raise CoordinatorTrustError(
                f"the coordinator at {self.address} presented key {presented}, but {self.known_file} remembers key "
                f"{fingerprint(known)} for it (trusted on first use): refusing to join; if the coordinator's key "
                f"really changed, delete the line for {self.address} from {self.known_file}")

    def known_key(self) -> bytes | None:
        """The key remembered for this address (the first line for it wins), or None."""
        if self.known_file is None or not self.known_file.exists():
            return None
        for line in self.known_file.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == self.address:
                try:
                    return bytes.fromhex(fields[1])
                except ValueError:
                    raise CoordinatorTrustError(f"{self.known_file}: the key for {self.address} is not hex; fix or "
                                                "delete that line") from None
        return None

    def remember(self, public_key: bytes) -> bool:
        """After the coordinator proved `public_key`: keep it if this address has none yet (trust on first use).
        True when it was written now."""
        if self.pin is not None or self.known_file is None or self.known_key() is not None:
            return False
        self.known_file.parent.mkdir(parents=True, exist_ok=True)
        new = not self.known_file.exists()
        with open(self.known_file, "a") as handle:
            if new:
                handle.write("# coordinator keys this node trusted on first use: HOST:PORT ED25519-PUBLIC-KEY-HEX\n")
            handle.write(f"{self.address} {public_key.hex()}\n")
        return True


def trust_from_flags(coordinator: str, coordinator_key: str | None, trust_on_first_use: bool,
                      key_path: Path) -> CoordinatorTrust:
    """The trust of `swarm-node join`'s flags: `--coordinator [FINGERPRINT@]HOST:PORT`, `--coordinator-key`,
    `--trust-on-first-use` (the pin wins when both are given). SwarmError for a malformed flag or no trust."""
    pin, _, address = coordinator.rpartition("@")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SwarmError(f"--coordinator {coordinator}: expected HOST:PORT or FINGERPRINT@HOST:PORT, as "
                         "`swarm-coordinator run` prints it")
    pins = {p.lower() for p in (pin, coordinator_key) if p}
    if len(pins) > 1:
        raise SwarmError(f"--coordinator {coordinator} and --coordinator-key {coordinator_key} pin different keys; "
                         "give one")
    if pins:
        (pin,) = pins
        if not _PIN.fullmatch(pin):
            raise SwarmError(f"coordinator key {pin}: expected 16 to 64 hex digits of its SHA-256 (the 'join with:' line gives 32)")
        return CoordinatorTrust(address, pin=pin)
    if trust_on_first_use:
        return CoordinatorTrust(address, known_file=Path(key_path).expanduser().parent / KNOWN_COORDINATORS)
    raise SwarmError(
        f"--coordinator {address} names no coordinator key to trust: add --coordinator-key FINGERPRINT, the "
        "fingerprint in the 'join with:' line `swarm-coordinator run` printed (ask the coordinator's operator "
        "for it), or --trust-on-first-use to trust whatever key answers at this address the first time")
