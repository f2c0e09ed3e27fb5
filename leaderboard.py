"""Leaderboard of net winnings: O(log n) updates, top-N reads without re-sorting."""

from itertools import islice

from sortedcontainers import SortedList


class Leaderboard:
    """Not thread-safe on its own: the wallet store calls it under its lock."""

    def __init__(self, size=10):
        self.size = size
        self._net = {}
        # Keyed by (-net, user_id): descending winnings, ties by user id ascending.
        self._ranked = SortedList()

    def __len__(self):
        return len(self._net)

    def net(self, user_id: str) -> int:
        """A player's net winnings so far (0 before their first outcome)."""
        return self._net.get(user_id, 0)

    def record(self, user_id, net):
        """Add one outcome's net to a player; return True when the top N changed."""
        old = self._net.get(user_id)
        before = self._top_keys()
        if old is not None:
            self._ranked.remove((-old, user_id))
        new = net if old is None else old + net
        self._net[user_id] = new
        self._ranked.add((-new, user_id))
        return self._top_keys() != before

    def _top_keys(self):
        return list(islice(self._ranked, self.size))

    def top(self):
        return [
            {"rank": rank, "user_id": user_id, "net_winnings": -neg}
            for rank, (neg, user_id) in enumerate(islice(self._ranked, self.size), start=1)
        ]
