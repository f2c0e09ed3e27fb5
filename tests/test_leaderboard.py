"""Unit tests for leaderboard.py: ranking order, the top-10 cut and record()'s "top changed" answer."""

from leaderboard import Leaderboard


def board_of(board):
    """The top as (user_id, net) pairs, for compact assertions."""
    return [(row["user_id"], row["net_winnings"]) for row in board.top()]


def test_empty_board():
    board = Leaderboard()
    assert board.top() == []
    assert len(board) == 0


def test_ranks_by_net_descending_and_ranks_from_one():
    board = Leaderboard()
    board.record("low", 5)
    board.record("high", 100)
    board.record("mid", 50)
    assert board.top() == [
        {"rank": 1, "user_id": "high", "net_winnings": 100},
        {"rank": 2, "user_id": "mid", "net_winnings": 50},
        {"rank": 3, "user_id": "low", "net_winnings": 5},
    ]


def test_ties_broken_by_user_id_ascending():
    board = Leaderboard()
    for uid in ["carol", "alice", "bob", "Zed", "_x", "-y"]:
        board.record(uid, 10)
    # Plain string (code point) order: "-" < digits < upper case < "_" < lower case.
    assert [uid for uid, _ in board_of(board)] == ["-y", "Zed", "_x", "alice", "bob", "carol"]


def test_nets_accumulate_per_player():
    board = Leaderboard()
    board.record("a", 30)
    board.record("b", 20)
    board.record("a", -25)
    assert board_of(board) == [("b", 20), ("a", 5)]
    assert len(board) == 2


def test_negative_nets_rank_below_zero_and_positive():
    board = Leaderboard()
    board.record("loser", -100)
    board.record("even", 0)
    board.record("small_loss", -1)
    board.record("winner", 7)
    assert board_of(board) == [("winner", 7), ("even", 0), ("small_loss", -1), ("loser", -100)]


def test_top_is_cut_at_ten_but_everyone_is_tracked():
    board = Leaderboard()
    for i in range(15):
        board.record(f"p{i:02d}", i)
    top = board.top()
    assert len(top) == 10
    assert [row["rank"] for row in top] == list(range(1, 11))
    assert [row["user_id"] for row in top] == [f"p{i:02d}" for i in range(14, 4, -1)]
    assert len(board) == 15


def test_size_is_configurable():
    board = Leaderboard(size=3)
    for i in range(5):
        board.record(f"p{i}", i)
    assert board_of(board) == [("p4", 4), ("p3", 3), ("p2", 2)]


def full_board():
    """Ten players p00..p09 with nets 100..1000 (p09 leads), plus an outsider with net 1."""
    board = Leaderboard()
    for i in range(10):
        board.record(f"p{i:02d}", (i + 1) * 100)
    board.record("outsider", 1)
    return board


def test_record_true_when_a_new_player_enters():
    board = Leaderboard()
    assert board.record("first", 0) is True  # a zero net still makes you a member
    assert board.record("second", -5) is True


def test_record_true_when_only_the_score_changes():
    board = full_board()
    assert board.record("p09", 1) is True  # still first, only the score moved
    assert board_of(board)[0] == ("p09", 1001)


def test_record_true_when_the_order_changes():
    board = full_board()
    assert board.record("p00", 150) is True  # 100 -> 250: passes p01 (200)
    assert [uid for uid, _ in board_of(board)][-2:] == ["p00", "p01"]


def test_record_true_when_an_outsider_enters_and_pushes_the_tenth_out():
    board = full_board()
    assert board.record("outsider", 149) is True  # 1 -> 150 passes p00 (100)
    ids = [uid for uid, _ in board_of(board)]
    assert "outsider" in ids and "p00" not in ids


def test_record_true_when_a_member_drops_out():
    board = full_board()
    assert board.record("p00", -1000) is True  # falls below the outsider
    ids = [uid for uid, _ in board_of(board)]
    assert ids[-1] == "outsider" and "p00" not in ids


def test_record_false_when_an_outsider_changes_without_entering():
    board = full_board()
    before = board.top()
    assert board.record("outsider", 98) is False  # 1 -> 99, still below p00 (100)
    assert board.record("outsider", -500) is False
    assert board.record("newcomer", 50) is False  # a new player who does not make the top
    assert board.top() == before


def test_record_false_for_a_zero_net_on_an_existing_member():
    board = full_board()
    assert board.record("p05", 0) is False


def test_tie_with_the_tenth_decided_by_user_id():
    board = full_board()
    # "a" ties p00 on 100 and sorts before it, so it takes tenth place.
    assert board.record("a", 100) is True
    assert board_of(board)[-1] == ("a", 100)
    # "zz" ties on 100 but sorts after "a", so nothing visible changes.
    assert board.record("zz", 100) is False


def test_ranks_exactly_at_the_64_bit_edges():
    # Python ints are exact: 2^63-1 ranks above 2^63-2 (double scores would tie them and fall back to the id).
    board = Leaderboard()
    board.record("a", 2**63 - 2)
    board.record("b", 2**63 - 1)
    board.record("c", -(2**63))
    board.record("d", -(2**63) + 1)
    assert board_of(board) == [("b", 2**63 - 1), ("a", 2**63 - 2), ("d", -(2**63) + 1), ("c", -(2**63))]
    assert board.net("b") == 2**63 - 1
