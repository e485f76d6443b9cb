"""Where jobs hand models to serving: the model catalog, "model ready to load" notices,
replica reports and heartbeats (records), and the channels that announce them
(messages). The job plane (:mod:`app.jobs`) and the serving plane (:mod:`app.serving`)
both use this package and never each other."""
