"""The job commands: jobs, fg and bg (the jobs themselves are ``userland.shell.jobs``)."""

from __future__ import annotations

from ..builtin import Shell, Streams, command, operands


@command()
def cmd_jobs(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the background jobs: [N], + for the current one, Running, Stopped, Done or Exit STATUS.

    A job is a command list ended by &; those that ended are listed once, then forgotten.
    Example: jobs  # what runs in the background
    """
    operands(args)
    for job in list(sh.jobs.jobs.values()):
        print(sh.jobs.line(job), file=io.stdout)
    sh.jobs.reap()


@command("[%N]")
def cmd_fg(sh: Shell, io: Streams, args: list[str]) -> int:
    """Bring job N (the current one unless named) to the foreground and wait for it; take its status.

    Ctrl-C then interrupts the job (a second one kills its programs), not the shell; Ctrl-Z
    stops its programs and gives the prompt back (bg or fg resumes them).
    Example: fg %3  # bring job 3 back
    """
    job = sh.jobs.find(operands(args, "%N")[0] if args else None)
    status = job.wait(announce=lambda: print(job.text, file=io.stdout, flush=True))
    if job.stopped:
        print(sh.jobs.line(job), file=io.stdout)
    else:
        sh.jobs.jobs.pop(job.number, None)
    return status


@command("[%N]")
def cmd_bg(sh: Shell, io: Streams, args: list[str]) -> None:
    """Resume job N (the current one unless named) in the background, if it is stopped.

    A job stops on Ctrl-Z while it is in the foreground (fg), or on kill -STOP %N.
    """
    job = sh.jobs.find(operands(args, "%N")[0] if args else None)
    job.resume()
    print(sh.jobs.line(job), file=io.stdout)
