"""Running and operating a sidecar: the two command lines (``tm-sidecar``, ``tmctl``),
the one settings table both read, structured logs, Prometheus metrics, systemd's notify
protocol, and the embedded etcd.

May import: core, etcd, leader, node, server, admin, web.
"""
