from conftest import process_exists, run_cli


def test_boot_status_shutdown_leaves_nothing(llmos):
    r = run_cli(llmos.home, "status")
    assert r.returncode == 0, r.stderr
    assert "storage" in r.stdout and "READY" in r.stdout
    storage_pid = llmos.service("storage")["pid"]
    assert process_exists(storage_pid)
    r = run_cli(llmos.home, "shutdown")
    assert r.returncode == 0, r.stderr
    assert not process_exists(llmos.kernel_pid)
    assert not process_exists(storage_pid)
    assert list(llmos.paths.run.iterdir()) == []
