from istio.proxy.main import main

main()
