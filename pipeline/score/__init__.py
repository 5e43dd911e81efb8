"""The score stage: decode once, score every configured scorer, commit scores/ shard by shard."""
