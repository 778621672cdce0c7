"""``jmp lab up``: the whole product on one machine, with a simulated PDU and board."""
