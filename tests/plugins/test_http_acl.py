"""/api/query takes the path a real query takes: the ACL first (issue 21 item 12)."""

from __future__ import annotations

import httpx
import trio

from tests.plugins.test_http import start


async def test_api_query_from_outside_allow_is_refused_with_ede_18(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path)  # default allow: loopback and private
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.get(
                    "/api/query", params={"name": "www.example.org", "client": "8.8.8.8"}
                )
                doc = r.json()
                assert r.status_code == 200
                assert doc["rcode"] == "REFUSED" and doc["answered_by"] == "acl"
                assert doc["ede"] == [{"code": 18, "text": "client not allowed"}]
                assert doc["answer"] == []
                assert any("8.8.8.8 is not in [server] allow" in line for line in doc["trace"])
                # No step saw the query, as for a real one from 8.8.8.8.
                assert server.chain.steps[0].hits == 0
                r = await http.get("/api/query", params={"name": "www.example.org"})
                assert r.json()["rcode"] == "NOERROR"
                assert server.chain.steps[0].hits == 1
            assert server.stats.queries == 0 and server.stats.refused_acl == 0  # traces
            server.stop()
