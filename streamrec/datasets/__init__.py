"""Datasets: MovieLens-100K from the recbole wheel, any interaction log a user brings, and a
synthetic generator for scale tests. All of them return an *interaction frame* (see
``streamrec.datasets.frames``) so that ``streamrec replay`` treats them alike."""
