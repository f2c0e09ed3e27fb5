"""Demo traffic: a few players deposit and play rounds against a running server, via the public HTTP API."""

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request

PLAYERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
GAMES = ["slots", "roulette", "blackjack", "dice"]


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (default %(default)s)")
    parser.add_argument("--rate", type=float, default=2.0, help="rounds per second (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (default: run until Ctrl-C)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable demo")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    try:
        for player in PLAYERS:
            call(args.url, "POST", "/api/wallet/deposit", {"user_id": player, "amount": 10_000})
    except urllib.error.URLError as err:
        sys.exit(f"demo.py: cannot reach {args.url} ({err.reason}); start the server first with `make run`")
    print(f"funded {len(PLAYERS)} players with 100.00 each; playing {args.rate:g} rounds/s (Ctrl-C to stop)")
    played = 0
    try:
        while not args.rounds or played < args.rounds:
            player, game = rng.choice(PLAYERS), rng.choice(GAMES)
            bet = rng.choice([100, 200, 500, 1000])
            payout = rng.choice([0, 0, 0, bet, 2 * bet, 3 * bet, 10 * bet])
            status, body = call(args.url, "POST", "/api/games/outcomes",
                                {"user_id": player, "game": game, "bet": bet, "payout": payout})
            if status == 409:  # broke: top the player up and carry on
                call(args.url, "POST", "/api/wallet/deposit", {"user_id": player, "amount": 10_000})
                print(f"{player:>8} ran out of money and deposited 100.00")
            else:
                print(f"{player:>8} {game:<10} bet {bet / 100:7.2f} payout {payout / 100:7.2f} "
                      f"net {body['net'] / 100:+8.2f} balance {body['balance'] / 100:9.2f}")
            played += 1
            time.sleep(1 / args.rate)
    except KeyboardInterrupt:
        pass
    status, board = call(args.url, "GET", "/api/leaderboard")
    print("leaderboard:", ", ".join(f"{e['rank']}. {e['user_id']} {e['net_winnings'] / 100:+.2f}"
                                    for e in board["leaderboard"]))


if __name__ == "__main__":
    main()
