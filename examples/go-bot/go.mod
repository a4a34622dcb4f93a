module pfcollector.local/go-bot-example

go 1.19

require pfcollector.local/pfclient v0.0.0

replace pfcollector.local/pfclient => ../../clients/go
