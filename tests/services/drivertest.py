"""A service for the tests: it drives the CPU driver service through the kernel, as the inference
service will, and records what it got in storage.

At start it asks cpu.info, then decodes 8 greedy tokens for one prompt with cpu.step (prefill as
one chunk, then one token per step, blocks assigned here), and stores the tokens under
``drivertest/tokens``. Not part of llmos.
"""

from syscalls.runtime.service import Service, main

PROMPT = [1, 5, 9, 13, 17, 21]


async def greedy(runtime, prompt: list[int], n: int, seq_id: int) -> list[int]:
    info = await runtime.call("cpu", "info", {})
    size = info["block_size"]
    blocks = list(range((len(prompt) + n) // size + 1))
    params = {"temperature": 0.0}
    out = await runtime.call("cpu", "step", {"batch": [
        {"seq_id": seq_id, "tokens": prompt, "start": 0, "block_table": blocks, "sample": True,
         "params": params}]})
    tokens = [out[0]["token"]]
    while len(tokens) < n:
        out = await runtime.call("cpu", "step", {"batch": [
            {"seq_id": seq_id, "tokens": tokens[-1:], "start": len(prompt) + len(tokens) - 1,
             "block_table": blocks, "sample": True, "params": None}]})
        tokens.append(out[0]["token"])
    await runtime.call("cpu", "release", {"seq_ids": [seq_id]})
    return tokens


class DriverTest(Service):
    name = "drivertest"

    async def start(self) -> None:
        tokens = await greedy(self.runtime, PROMPT, 8, seq_id=1)
        info = await self.runtime.call("cpu", "info", {})
        await self.runtime.call("storage", "put", {"key": "drivertest/tokens", "value": tokens,
                                                   "if_version": None, "ns": None})
        await self.runtime.call("storage", "put", {"key": "drivertest/info", "value": info,
                                                   "if_version": None, "ns": None})


if __name__ == "__main__":
    main(DriverTest)
