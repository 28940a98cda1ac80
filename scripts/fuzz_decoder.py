"""Coverage-guided fuzzing of the protocol decoder with atheris (libFuzzer).

    python scripts/fuzz_decoder.py -runs=100000      # or any libFuzzer flags

Every input, on every channel and for every sender, must decode to a message that re-encodes
to an equal message, or raise ProtocolError; anything else is a crash libFuzzer reports.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from membacking.protocol import ProtocolError, decode, encode
    from membacking.protocol.messages import Channel

CHANNELS = list(Channel)
SENDERS = [None, "mapper", "manager", "client"]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    channel = CHANNELS[data[0] % len(CHANNELS)]
    sender = SENDERS[(data[0] // len(CHANNELS)) % len(SENDERS)]
    try:
        msg = decode(data[1:], channel, sender=sender)
    except ProtocolError:
        return
    if decode(encode(msg), channel) != msg:
        raise AssertionError(f"{msg!r} does not round-trip")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
