"""The kernel's accounting reads only the table and the replies: no service is known by name."""

from kernel import accounting
from kernel.proctable import STOPPED, ProcessTable


def test_usage_is_added_to_the_process_and_what_is_unknown_is_ignored():
    table = ProcessTable(kernel_uid=1000)
    proc = table.create(ppid=1, uid=1000, name="p", argv=[])
    accounting.charge(proc, {"tokens_in": 7, "tokens_out": 3, "storage_bytes": 40})
    accounting.charge(proc, {"tokens_out": 2, "storage_bytes": -15, "joules": 9, "tokens_in": 1.5})
    accounting.charge(proc, ["not", "a", "map"])
    assert (proc.tokens_in, proc.tokens_out, proc.bytes_stored) == (7, 5, 25)


def test_caller_context_is_what_the_row_names_as_the_process_stands():
    table = ProcessTable(kernel_uid=1000)
    proc = table.create(ppid=1, uid=1000, name="p", argv=[], priority=5,
                        limits={"kv_blocks": 8, "storage_bytes": 100})
    proc.bytes_stored, proc.state = 30, STOPPED
    assert accounting.caller_context(proc, ("priority", "stopped", "limits")) == \
        {"priority": 5, "stopped": True, "limits": {"kv_blocks": 8}}
    assert accounting.caller_context(proc, ("storage_allowance",)) == \
        {"storage_allowance": {"pid": proc.pid, "limit": 100, "left": 70}}
    proc.limits = {}
    assert accounting.caller_context(proc, ("storage_allowance",)) == {}


def test_model_work_is_kept_per_reporting_service():
    table = ProcessTable(kernel_uid=1000)
    a, b = (table.create(ppid=1, uid=1000, name=n, argv=[]) for n in "ab")
    accounting.record_work(table, "one", [{"pid": a.pid, "state": "running", "kv_blocks": 2}])
    accounting.record_work(table, "two", [{"pid": b.pid, "state": "ready"}])
    accounting.record_work(table, "one", [])           # one's work ended; two's is untouched
    assert a.model == {} and a.model_by is None
    assert b.model["state"] == "ready" and b.model_by == "two"
