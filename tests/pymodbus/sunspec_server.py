#!/usr/bin/env python3
"""A third-party Modbus TCP server loaded with a SunSpec map: common model 1 and storage
model 124 at 40000, served by pymodbus (pip install 'pymodbus>=3.6,<4').

It holds registers and nothing more: writes are stored and read back as written, with no
battery behind them. The MAX300 tests run the agent against it to show that the agent's
SunSpec client works with a Modbus stack other than our own simulator.

    python3 sunspec_server.py PORT [--unit N]

Prints "listening on 127.0.0.1:PORT" on stdout once it accepts connections.
"""

import argparse
import asyncio
import logging
import sys

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusTcpServer

BASE = 40000
NOT_IMPLEMENTED_U16 = 0xFFFF
NOT_IMPLEMENTED_I16 = 0x8000


def sunssf(exponent):
    """A scale factor as its register holds it (int16, two's complement)."""
    return exponent & 0xFFFF


def text(value, registers):
    """An ASCII string as NUL-padded registers, two bytes each, big-endian."""
    data = value.encode("ascii")[: registers * 2].ljust(registers * 2, b"\0")
    return [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]


def sunspec_map():
    """The registers from BASE on: SunS, model 1, model 124, end marker."""
    common = [1, 66]
    common += text("pymodbus", 16)  # Mn
    common += text("sunspec-124-test", 16)  # Md
    common += text("", 8)  # Opt
    common += text("1.0", 8)  # Vr
    common += text("PYMODBUS-0001", 16)  # SN
    common += [1, NOT_IMPLEMENTED_I16]  # DA, pad
    assert len(common) == 68

    storage = [NOT_IMPLEMENTED_U16] * 26
    storage[0:2] = [124, 24]
    storage[2] = 1000  # WChaMax: 1000 x 10^2 W = 100 kW
    storage[5] = 0  # StorCtl_Mod: idle
    storage[7] = 100  # MinRsvPct: 10.0 %
    storage[8] = 615  # ChaState: 61.5 %
    storage[11] = 6  # ChaSt: holding
    storage[12] = 0  # OutWRte
    storage[13] = 0  # InWRte
    storage[14] = 0  # InOutWRte_WinTms
    storage[15] = 0  # InOutWRte_RvrtTms
    storage[16] = 0  # InOutWRte_RmpTms
    storage[17] = 1  # ChaGriSet: grid
    storage[18] = sunssf(2)  # WChaMax_SF
    storage[19] = NOT_IMPLEMENTED_I16  # WChaDisChaGra_SF
    storage[20] = NOT_IMPLEMENTED_I16  # VAChaMax_SF
    storage[21] = sunssf(-1)  # MinRsvPct_SF
    storage[22] = sunssf(-1)  # ChaState_SF
    storage[23] = NOT_IMPLEMENTED_I16  # StorAval_SF
    storage[24] = NOT_IMPLEMENTED_I16  # InBatV_SF
    storage[25] = sunssf(-2)  # InOutWRte_SF
    return [0x5375, 0x6E53] + common + storage + [0xFFFF, 0]


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--unit", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    # With the block at address 1, protocol register N is values[N] (pymodbus 3.x).
    registers = sunspec_map()
    values = [0] * BASE + registers + [0] * 8
    block = ModbusSequentialDataBlock(1, values)
    context = ModbusServerContext(
        devices={args.unit: ModbusDeviceContext(hr=block)}, single=False
    )
    server = ModbusTcpServer(context, address=("127.0.0.1", args.port))
    await server.serve_forever(background=True)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    await server.serving


if __name__ == "__main__":
    asyncio.run(main())
