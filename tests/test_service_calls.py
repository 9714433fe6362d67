"""Services call each other through the kernel; a configured module adds a service."""

from conftest import FAST_CONFIG, Booted


def test_a_service_reaches_another_through_the_kernel(home):
    (home / "config.toml").write_text(
        FAST_CONFIG + '[services]\nenabled = ["storage"]\nmodules = {relay = "tests.services.relay"}\n')
    system = Booted(home).boot()
    try:
        with system.connect() as c:
            names = {s["name"]: s for s in c.services()}
            assert names["relay"]["state"] == "READY"
            # written by the relay at start, through kernel-routed calls to storage; such a
            # caller acts for pid 1, with the kernel's uid, so the key is in that user's namespace
            assert c.get("relay/started")["value"] == "yes"
            refused = c.get("relay/refused")["value"]
            assert refused.startswith("ENOENT") and "no service 'nonesuch'" in refused
    finally:
        system.shutdown()


def test_unknown_service_module_config_is_refused(home):
    from conftest import run_cli
    (home / "config.toml").write_text('[services]\nmodules = {relay = "not a module"}\n')
    r = run_cli(home, "boot", "--timeout", "20")
    assert r.returncode == 1 and "services.modules must map" in r.stderr
