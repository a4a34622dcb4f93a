module pfcollector.local/pfclient

go 1.19
