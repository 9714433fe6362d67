"""The runtime every llmos process runs on, beneath the kernel, the services and the drivers.

The socket channel (``channel``), logging (``logs``), config.toml (``config``), restart pacing
(``backoff``), starting and stopping a child process (``child``), the service process's loop
(``service``), the model registry (``models``), which driver service runs the model
(``devices``) and the step messages a driver answers (``steps``).

Never: import the kernel, a service, a driver or userland; the ABI beside it (``syscalls.*``)
never imports this package, so a program that only makes syscalls never loads it.
"""
