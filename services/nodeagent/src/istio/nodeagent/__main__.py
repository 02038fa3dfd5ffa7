from istio.nodeagent.main import main

main()
