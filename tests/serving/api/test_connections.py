"""serving/api/rest/connections.py's CoalescingWriter: one write per turn of the event loop.
(Over loopback a client cannot tell one send from two, so this is tested on the writer; the
gateway's answers through it are tested everywhere else.)"""

import asyncio

from serving.api.rest.connections import CoalescingWriter


class Recorder:
    def __init__(self):
        self.writes, self.closed = [], False

    def write(self, data):
        self.writes.append(data)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


def test_writes_of_one_turn_go_out_as_one_and_close_flushes_first():
    async def main():
        t = Recorder()
        w = CoalescingWriter(t, asyncio.get_running_loop())
        w.write(b"HTTP/1.1 200 OK\r\n\r\n")
        w.write(b"body")
        assert t.writes == []  # held until the end of this turn
        await asyncio.sleep(0)
        assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        w.write(b"next")
        w.close()  # nothing written is lost when the connection closes
        assert t.writes[-1] == b"next" and t.closed
        await asyncio.sleep(0)
        assert len(t.writes) == 2

    asyncio.run(main())

