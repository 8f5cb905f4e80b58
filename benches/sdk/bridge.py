"""The Python bridge alone: a counting handler served on the `mem` backend and read by the SDK
client in the same process, 20,000 items over 1 and 16 streams; prints items/s and µs per item
(both ends of the bridge). Run with a Python that has the SDK: `python benches/sdk/bridge.py`."""
import asyncio
import os
import time

from dynamix.runtime import DistributedRuntime
async def count(n):
    for i in range(n):
        yield i
async def main():
    os.environ.setdefault("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "0")
    rt = DistributedRuntime(asyncio.get_running_loop(), "mem")
    ep = rt.endpoint("bench.bridge.generate")
    server = asyncio.create_task(ep.serve_endpoint(count))
    client = await ep.client(); await client.wait_for_instances()
    for streams in (1, 16):
        n = 20000 // streams
        async def one():
            got = 0
            async for _ in await client.round_robin(n, annotated=False):
                got += 1
            return got
        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(streams))))
        dt = time.perf_counter() - t0
        print(f"mem bridge, {streams} streams: {total/dt:,.0f} items/s ({dt/total*1e6:.1f} us/item, handler and client in one process)")
    rt.shutdown(); await server
asyncio.run(main())
