"""A service for the tests: it reaches storage through the kernel, as a service-to-service caller.

Enabled with ``[services] modules = {relay = "tests.services.relay"}``. At start it writes
``relay/started`` into storage; its op ``relay`` (a streaming op, reached by no syscall) is used
only through another service. Not part of llmos.
"""

from syscalls.runtime.service import Service, main


class Relay(Service):
    name = "relay"

    async def start(self) -> None:
        self.log.info("relay_starting")
        self.stored = await self.runtime.call(
            "storage", "put", {"key": "relay/started", "value": "yes", "if_version": None,
                               "ns": None})
        try:
            await self.runtime.call("nonesuch", "op", {})
        except Exception as e:            # noqa: BLE001 - recorded for the test to read
            self.refused = f"{type(e).__name__}: {e}"
        await self.runtime.call("storage", "put", {"key": "relay/refused", "value": self.refused,
                                                   "if_version": None, "ns": None})


if __name__ == "__main__":
    main(Relay)
