"""The suite's shared Ray cluster answers tasks and exposes the job server."""

from __future__ import annotations

import httpx


def test_cluster_runs_tasks_and_serves_dashboard(ray_cluster):
    import ray

    @ray.remote(num_cpus=0.1)
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    r = httpx.get(f"{ray_cluster['dashboard_url']}/api/version", headers=ray_cluster["auth_headers"], timeout=30)
    assert r.status_code == 200
